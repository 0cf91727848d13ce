"""Few-shot organ segmentation: readers, episodes (setting 2), PANet's head, the ODE block, Dice,
the seven attacks, the recipes in the one trainer and the command line (docs/segmentation.md)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from metarobust.attacks.apgd import APGD
from metarobust.data.seg_episodes import (
    SegEpisodeSampler,
    aligned_slice,
    evaluation_episodes,
    split_volumes,
    training_organs,
)
from metarobust.data.seg_volumes import CHAOS_ORGANS, read_chaos_t2, read_nifti, synthetic_volumes
from metarobust.errors import ConfigError, DataError
from metarobust.segmentation.attacks import (
    ENSEMBLE,
    SEG_ATTACKS,
    SegAttack,
    episode_dice,
    episode_loss,
    never_fooled,
)
from metarobust.segmentation.dice import dice, mean_ci95, volume_dice, volume_hd95
from metarobust.segmentation.network import build_segmenter
from metarobust.segmentation.ode import ODEBlock
from metarobust.segmentation.prototypes import cosine_logits, masked_average_pooling, prototypes
from metarobust.segmentation.square import square_linf


@pytest.fixture(scope="module")
def vols():
    return synthetic_volumes(count=8, size=32, depth=16, seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_segmenter("seg_light", hidden=4, ode=True, ode_solver="rk4", ode_steps=2).eval()


def _episode(t=2, k=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(t, k, 1, size, size, generator=g)
    sm = torch.zeros(t, k, size, size, dtype=torch.long)
    sm[..., 4:10, 4:10] = 1
    qx = torch.rand(t, 1, 1, size, size, generator=g)
    qm = torch.zeros(t, 1, size, size, dtype=torch.long)
    qm[..., 5:11, 3:9] = 1
    return sx, sm, qx, qm


# -- PANet's head and Dice against hand-computed values -------------------------------------------
def test_masked_average_pooling_is_the_mean_over_the_mask():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    m = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    out = masked_average_pooling(f, m)
    assert torch.allclose(out, torch.tensor([[1.5, 5.0]]) * 2 / (2 + 1e-5))


def test_prototypes_average_background_and_foreground_over_shots():
    fs = torch.zeros(1, 2, 1, 2, 2)
    fs[0, 0] = 2.0
    fs[0, 1] = 4.0
    fs[0, 1, 0, 0, 0] = 10.0                     # shot 2's only foreground pixel
    ms = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    ms[0, :, 0, 0] = 1
    p = prototypes(fs, ms)                        # [1, 2 (bg, fg), 1]
    assert torch.allclose(p[0, 1, 0], torch.tensor((2.0 + 10.0) / 2), atol=1e-4)
    assert torch.allclose(p[0, 0, 0], torch.tensor((2.0 + 4.0) / 2), atol=1e-4)


def test_cosine_logits_are_twenty_times_the_cosine():
    f = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)
    protos = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    out = cosine_logits(f, protos)[0, 0, :, 0, 0]
    assert torch.allclose(out, torch.tensor([20.0, 20.0 / 2 ** 0.5]))


def test_dice_against_hand_computed_values():
    p = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    g = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert torch.allclose(dice(p, g), torch.tensor([2 / 3, 1.0, 0.0]))
    assert volume_dice(torch.ones(2, 2, 2), torch.cat([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])) == pytest.approx(8 / 12)
    mean, ci = mean_ci95([0.5, 0.7])
    assert mean == pytest.approx(0.6) and ci == pytest.approx(1.959963984540054 * (0.02 ** 0.5) / 2 ** 0.5)


def test_dice_agrees_with_monai_and_hd95_with_hand_computed_distances():
    monai = pytest.importorskip("monai.metrics", reason="MONAI (the seg extra) cross-checks Dice and computes HD95")
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 3, 6, 6, generator=gen) > 0.5
    true = torch.rand(4, 3, 6, 6, generator=gen) > 0.4
    theirs = monai.compute_dice(pred[:, None].float(), true[:, None].float(), include_background=True)
    assert torch.allclose(dice(pred, true), theirs.flatten().float(), atol=1e-6)  # float32 of the same ratio
    # a cube against the same cube shifted by 2 slices: every surface voxel of either is within
    # 2 voxels of the other, the faces that do not overlap exactly 2 away: HD95 = 2
    cube = torch.zeros(12, 10, 10, dtype=torch.bool)
    cube[2:6, 3:7, 3:7] = True
    shifted = torch.roll(cube, 2, dims=0)
    assert volume_hd95(cube, cube) == 0.0
    assert volume_hd95(shifted, cube) == pytest.approx(2.0)
    assert math.isnan(volume_hd95(torch.zeros_like(cube), cube))  # an empty prediction: undefined


# -- the ODE block -------------------------------------------------------------------------------
def _rk4_three_eighths(func, z, time, steps):
    """Kutta's 3/8-rule RK4 with fixed steps, written out (torchdiffeq's ``rk4``)."""
    h, t = time / steps, torch.tensor(0.0, dtype=z.dtype)
    for _ in range(steps):
        k1 = func(t, z)
        k2 = func(t + h / 3, z + h * k1 / 3)
        k3 = func(t + 2 * h / 3, z + h * (k2 - k1 / 3))
        k4 = func(t + h, z + h * (k1 - k2 + k3))
        z, t = z + (k1 + 3 * (k2 + k3) + k4) * h / 8, t + h
    return z


def test_ode_block_solvers_agree_with_a_fixed_step_reference():
    torch.manual_seed(0)
    block = ODEBlock(8, layers=3, time=1.0, method="rk4", steps=8).double()
    z0 = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        fixed = block(z0)
        assert torch.allclose(fixed, _rk4_three_eighths(block.func, z0, 1.0, 8), atol=1e-12)
        reference = _rk4_three_eighths(block.func, z0, 1.0, 100)   # converged to ~1e-5
        block.method, block.rtol, block.atol = "dopri5", 1e-6, 1e-6
        adaptive = block(z0)
    assert torch.allclose(adaptive, reference, atol=1e-3)
    assert not torch.allclose(reference, z0, atol=0.1)              # the block did move the features


def test_ode_block_counts_evaluations_and_backpropagates_through_the_solver():
    torch.manual_seed(0)
    block = ODEBlock(4, method="rk4", steps=4)
    z = block(torch.randn(1, 4, 6, 6))
    assert block.nfe == 16                       # 4 steps x 4 stages
    z.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    adaptive = ODEBlock(4)                       # dopri5, rtol = atol = 1e-3, t = 4: the paper's
    adaptive(torch.randn(1, 4, 6, 6))
    assert (adaptive.method, adaptive.time, adaptive.rtol, adaptive.atol) == ("dopri5", 4.0, 1e-3, 1e-3)
    assert adaptive.nfe >= 8


# -- readers ----------------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_chaos_tar(path, slices, label_of=lambda v, z: 1, shape_of=lambda v, z: (8, 8)):
    rows = ["file,volume_id,slice_index,label_values_present"]
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for v, z in slices:
            name = f"CHAOST2_{v}_slice{z:03d}.png"
            img = np.full((8, 8), 40 * z, np.uint8)
            lab = np.zeros(shape_of(v, z), np.uint8)
            lab[2:5, 2:5] = label_of(v, z)
            add(f"images/{name}", _png(img))
            add(f"labels/{name}", _png(lab))
            rows.append(f"{name},{v},{z},{label_of(v, z) or ''}")
        add("index.csv", ("\n".join(rows) + "\n").encode())


def test_chaos_reader_reads_the_staged_slice_format(tmp_path):
    path = tmp_path / "chaos.tar"
    _write_chaos_tar(path, [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)], label_of=lambda v, z: 4 if z else 0)
    vols = read_chaos_t2(path, size=4)
    assert vols.ids == ["1", "2"] and vols.lengths.tolist() == [2, 3]
    assert vols.images.shape == (5, 4, 4) and vols.images.dtype == torch.uint8
    assert vols.images[1].float().mean() == pytest.approx(40, abs=1)   # area resize keeps intensity
    assert set(vols.labels.unique().tolist()) == {0, 4}                # nearest keeps label ids
    assert vols.organ_slices(1, 4).tolist() == [3, 4]


@pytest.mark.parametrize("case, message", [
    ("gap", "slice indices"), ("shape", "differ"), ("label", "unknown label ids")])
def test_chaos_reader_names_bad_volumes(tmp_path, case, message):
    path = tmp_path / "bad.tar"
    if case == "gap":
        _write_chaos_tar(path, [(1, 0), (1, 2)])
    elif case == "shape":
        _write_chaos_tar(path, [(1, 0)], shape_of=lambda v, z: (8, 6))
    else:
        _write_chaos_tar(path, [(1, 0)], label_of=lambda v, z: 7)
    with pytest.raises(DataError, match=message):
        read_chaos_t2(path, size=8)


def test_nifti_reader_normalises_maps_labels_and_checks_shapes(tmp_path):
    nib = pytest.importorskip("nibabel")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    img = np.full((8, 8, 3), -1024.0, np.float32)
    img[..., 1] = 1024.0
    lab = np.zeros((8, 8, 3), np.int16)
    lab[2:6, 2:6, 1] = 6                                  # BCV's liver id
    lab[0, 0, 2] = 9                                      # an organ outside the study
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / "images" / "img0003.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "labels" / "label0003.nii.gz"))
    vols = read_nifti(tmp_path, CHAOS_ORGANS, size=4, modality="ct", label_map={6: 1, 9: 0})
    assert vols.ids == ["3"] and vols.images.shape == (3, 4, 4)
    assert vols.images[0].max() == 0 and vols.images[1].min() == round(255 * 2048 / 4096)
    assert vols.labels[1].sum() == 4 and vols.labels[2].sum() == 0
    with pytest.raises(DataError, match="not in the label map"):
        read_nifti(tmp_path, CHAOS_ORGANS, size=4, label_map={6: 1})
    with pytest.raises(DataError, match="unknown label ids"):
        read_nifti(tmp_path, CHAOS_ORGANS, size=4)
    nib.save(nib.Nifti1Image(lab[:, :, :2], np.eye(4)), str(tmp_path / "labels" / "label0003.nii.gz"))
    with pytest.raises(DataError, match="differ"):
        read_nifti(tmp_path, CHAOS_ORGANS, size=4, label_map={6: 1, 9: 0})



# -- episodes: setting 2 and the relative-depth alignment --------------------------------------------
def test_training_organs_exclude_the_test_organ_and_both_kidneys():
    assert training_organs(CHAOS_ORGANS, "liver") == [2, 3, 4]
    assert training_organs(CHAOS_ORGANS, "left_kidney") == [1, 4]
    assert training_organs(CHAOS_ORGANS, "right_kidney") == [1, 4]
    with pytest.raises(DataError, match="seg.organ"):
        training_organs(CHAOS_ORGANS, "heart")


def test_aligned_slice_is_the_same_relative_depth():
    assert aligned_slice(torch.tensor(0), torch.tensor(10), torch.tensor(5)) == 0
    assert aligned_slice(torch.tensor(9), torch.tensor(10), torch.tensor(5)) == 4
    assert aligned_slice(torch.tensor(3), torch.tensor(7), torch.tensor(13)) == 6
    assert aligned_slice(torch.tensor(0), torch.tensor(1), torch.tensor(4)) == 0


def test_training_episodes_never_show_the_test_organ_and_align_support_depth(vols):
    organs = training_organs(vols.organs, "spleen")
    sampler = SegEpisodeSampler(vols, organs, shots=2, tasks=64, seed=0, augment=False, reverse=False)
    batch = sampler.sample()
    assert batch.support_x.shape == (64, 2, 1, 32, 32) and batch.query_mask.shape == (64, 1, 32, 32)
    assert set(batch.organ.tolist()) <= set(organs) and 4 not in batch.organ.tolist()
    for t in range(64):
        o = int(batch.organ[t])
        q, s = int(batch.query_index[t, 0]), batch.support_index[t].tolist()
        vq = int((vols.starts <= q).sum()) - 1
        vs = [int((vols.starts <= i).sum()) - 1 for i in s]
        assert len({vq, *vs}) == 3                                  # K + 1 distinct volumes
        qs = vols.organ_slices(vq, o).tolist()
        for i, v in zip(s, vs):
            ss = vols.organ_slices(v, o).tolist()
            expected = aligned_slice(torch.tensor(qs.index(q)), torch.tensor(len(qs)), torch.tensor(len(ss)))
            assert ss.index(i) == int(expected)
        assert torch.equal(batch.query_mask[t, 0], (vols.labels[q] == o).long())
        assert torch.equal(batch.query_x[t, 0, 0], vols.images[q].float() / 255)


def test_augmentation_moves_images_and_masks_together(vols):
    sampler = SegEpisodeSampler(vols, [1], shots=1, tasks=16, seed=1, augment=True, reverse=True)
    batch = sampler.sample()
    for t in range(16):
        q = int(batch.query_index[t, 0])
        raw_img, raw_mask = vols.images[q].float() / 255, (vols.labels[q] == 1).long()
        found = False
        for k in range(4):
            for fx in (False, True):
                for fy in (False, True):
                    img, mask = torch.rot90(raw_img, k), torch.rot90(raw_mask, k)
                    img, mask = (img.flip(-1), mask.flip(-1)) if fx else (img, mask)
                    img, mask = (img.flip(-2), mask.flip(-2)) if fy else (img, mask)
                    found |= torch.equal(img, batch.query_x[t, 0, 0]) and torch.equal(mask, batch.query_mask[t, 0])
        assert found


def test_sampler_resumes_the_same_episodes(vols):
    a = SegEpisodeSampler(vols, [1, 2], shots=1, tasks=3, seed=5)
    a.sample()
    state = a.state_dict()
    b = SegEpisodeSampler(vols, [1, 2], shots=1, tasks=3, seed=99)
    b.load_state_dict(state)
    assert torch.equal(a.sample().query_x, b.sample().query_x)


def test_test_episodes_take_every_organ_slice_with_the_first_k_training_volumes(vols):
    split = split_volumes(vols.ids)
    assert sorted(sum(split.values(), [])) == sorted(vols.ids) and len(split["test"]) == 3
    train, test = vols.subset(split["train"]), vols.subset(split["test"])
    support_ids, episodes = evaluation_episodes(train, test, "liver", 3)
    assert support_ids == train.ids[:3]
    assert [e.id for e in episodes] == test.ids
    for e, v in zip(episodes, range(len(test))):
        assert torch.equal(e.query, test.organ_slices(v, 1)) and e.support.shape == (len(e.query), 3)
        first = train.organ_slices(0, 1)
        assert e.support[0, 0] == first[0] and e.support[-1, 0] == first[-1]


# -- attacks ----------------------------------------------------------------------------------------
CHEAP = {"apgd_steps": 10, "square_queries": 40}  # test budgets for APGD-CE and Square


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", "apgd_ce", "square", "ensemble"])
@pytest.mark.parametrize("target", ["query", "support"])
def test_linf_attacks_stay_in_the_ball_and_the_box_and_leave_the_other_input(tiny_model, name, target):
    sx, sm, qx, qm = _episode(k=2)
    eps = 0.05
    sx2, qx2 = SegAttack(name, eps, target, **CHEAP)(tiny_model, sx, sm, qx, qm, torch.Generator().manual_seed(0))
    x, adv, other, other_adv = (qx, qx2, sx, sx2) if target == "query" else (sx, sx2, qx, qx2)
    assert torch.equal(other, other_adv)
    assert (adv - x).abs().max() <= eps + 1e-6 and (adv - x).abs().max() > 0
    assert adv.min() >= 0 and adv.max() <= 1


def test_unclipped_reference_variants_leave_the_box_but_keep_the_budget(tiny_model):
    sx, sm, qx, qm = _episode()
    qx = qx.clamp(0.02, 0.98)
    qx[..., :4, :] = 1.0                                            # pixels at the box's edge
    for name, budget in (("fgsm", 0.05), ("pgd", 0.05), ("smia", 0.5)):
        _, adv = SegAttack(name, 0.05, "query", clip=False)(tiny_model, sx, sm, qx, qm, torch.Generator())
        assert (adv - qx).abs().max() <= budget + 1e-5
        if name != "smia":
            assert adv.max() > 1 or adv.min() < 0
        else:
            assert adv.min() >= 0                                   # SMIA's reference clamps at 0 only
    _, clipped = SegAttack("smia", 0.05, "query")(tiny_model, sx, sm, qx, qm)
    assert clipped.max() <= 1 and (clipped - qx).abs().max() <= 0.5 + 1e-6


def test_every_attack_makes_the_query_worse(tiny_model):
    """Each attack but DAG raises the per-pixel CE (DAG ascends a target margin on the pixels
    still right: tested below)."""
    from metarobust.segmentation.attacks import pixel_loss

    sx, sm, qx, qm = _episode()
    with torch.no_grad():
        logits = tiny_model(sx, sm, qx)
    clean_loss = pixel_loss(logits, qm)
    for name in SEG_ATTACKS:  # SMIA's steps are eps each, unprojected: a smaller eps keeps them ascending
        sx2, qx2 = SegAttack(name, 0.005 if name == "smia" else 0.02, "query", **CHEAP)(
            tiny_model, sx, sm, qx, qm, torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = tiny_model(sx2, sm, qx2)
        if name != "dag":
            assert pixel_loss(logits, qm) > clean_loss, name


def _pixelwise(z):
    """A segmenter whose pixels are independent: foreground logit 10 (x - 0.5)."""
    fg = 10 * (z[:, :, 0] - 0.5)
    return torch.stack([torch.zeros_like(fg), fg], dim=2)


def test_dag_flips_pixels_of_a_pixelwise_model():
    """A model whose pixels are independent (fg logit 10 (x - 0.5)): DAG must flip every pixel
    within reach, those with |x - 0.5| < the total perturbation, and no other."""
    from metarobust.segmentation.attacks import dag

    x = torch.linspace(0.3, 0.7, 64).view(1, 1, 1, 8, 8)
    mask = (x[:, :, 0] > 0.5).long()
    adv = dag(_pixelwise, x, mask, gamma=0.01, steps=20)
    flipped = _pixelwise(adv).argmax(2) != mask
    assert flipped[(x[:, :, 0] - 0.5).abs() < 0.15].all()
    assert not flipped[(x[:, :, 0] - 0.5).abs() > 0.2 + 1e-6].any()
    with pytest.raises(ValueError, match="seg.attacks"):
        SegAttack("fab", 0.1)  # FAB is not in the ensemble (docs/segmentation.md)


def test_apgd_on_label_maps_returns_each_episodes_highest_loss_iterate(tiny_model):
    """APGD with a per-episode loss and fooled= never true: per episode, the returned point is
    the best of every iterate scored, and SegAttack's apgd_ce never falls below the clean loss."""
    sx, sm, qx, qm = _episode()
    seen = []

    def recording(logits, mask):
        loss = episode_loss(logits, mask)
        seen.append(loss.detach())
        return loss

    def forward(z):
        return tiny_model(sx, sm, z)

    adv = APGD("linf", 0.05, steps=8)(forward, qx, qm, recording, fooled=never_fooled, seed=0)
    with torch.no_grad():
        final = episode_loss(forward(adv), qm)
    assert len(seen) == 9 and torch.allclose(final, torch.stack(seen).amax(0), atol=1e-5)
    assert (adv - qx).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    _, seg_adv = SegAttack("apgd_ce", 0.05, **CHEAP)(tiny_model, sx, sm, qx, qm, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (episode_loss(forward(seg_adv), qm) >= episode_loss(forward(qx), qm)).all()


def test_square_keeps_a_candidate_only_when_it_raises_the_episodes_objective(tiny_model):
    sx, sm, qx, qm = _episode()
    seen = []

    def objective(z):
        loss = episode_loss(tiny_model(sx, sm, z), qm)
        seen.append(loss)
        return loss

    adv = square_linf(objective, qx, 0.05, queries=30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = episode_loss(tiny_model(sx, sm, adv), qm)
    # 30 queries, then the result and the clean input: the result is the best of all of them
    assert len(seen) == 32 and torch.allclose(final, torch.stack(seen).amax(0))
    assert (adv - qx).abs().max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_square_with_a_large_eps_drives_the_dice_of_a_pixelwise_segmenter_down():
    x = torch.rand(2, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = (x[:, :, 0] > 0.5).long()
    adv = square_linf(lambda z: episode_loss(_pixelwise(z), mask), x, 0.5, queries=100,
                      generator=torch.Generator().manual_seed(0))
    assert (episode_dice(_pixelwise(x), mask) == 1).all()
    assert (episode_dice(_pixelwise(adv), mask) < 0.5).all()


def test_the_ensemble_is_no_better_than_any_of_its_members(tiny_model):
    sx, sm, qx, qm = _episode(t=3)
    attack = SegAttack("ensemble", 0.05, **CHEAP)

    def forward(z):
        return tiny_model(sx, sm, z)

    members = attack.candidates(forward, qx, qm, torch.Generator().manual_seed(0))
    adv = attack.perturb(forward, qx, qm, torch.Generator().manual_seed(0))
    assert tuple(members) == ENSEMBLE
    with torch.no_grad():
        worst = episode_dice(forward(adv), qm)
        for name, member in members.items():
            assert (worst <= episode_dice(forward(member), qm)).all(), name
        assert (worst == torch.stack([episode_dice(forward(m), qm) for m in members.values()]).amin(0)).all()


def test_apgd_refuses_fooled_when_targeted():
    x = torch.rand(1, 1, 1, 8, 8)
    with pytest.raises(ConfigError, match="fooled="):
        APGD("linf", 0.1, steps=2, targeted=True, loss="ce")(_pixelwise, x, (x[:, :, 0] > 0.5).long(),
                                                             episode_loss, fooled=never_fooled, seed=0)


# -- recipes in the one trainer, and the command line -------------------------------------------------
def _cfg(recipe, tmp_path, *extra):
    from metarobust.seg_experiment import load_seg_config

    return load_seg_config("configs/seg/synthetic_pnode.yaml", [
        f"recipe={recipe}", "seg.image_size=32", "seg.synthetic_volumes=8", "model.hidden=4", "seg.ode_steps=2",
        "train.iterations=2", "train.log_every=1", "seg.attacks=[fgsm]", "seg.eps=[0.03]", f"out_dir={tmp_path}",
        "device=cpu", *extra])


def test_r_pnode_without_its_regularisers_is_pnode(tmp_path):
    from metarobust.seg_experiment import load_seg_volumes
    from metarobust.training.data import TrainingData
    from metarobust.training.engine import Trainer

    losses = {}
    for recipe, extra in (("seg_pnode", ()), ("seg_r_pnode", ("seg.noise_std=0", "seg.cluster_weight=0",
                                                               "seg.consistency_weight=0"))):
        cfg = _cfg(recipe, tmp_path, *extra)
        train, _ = load_seg_volumes(cfg)
        trainer = Trainer(cfg, data=TrainingData(train, None, None), progress=False)
        loss, stats = trainer.train_step()
        losses[recipe] = float(loss)
    assert losses["seg_r_pnode"] == pytest.approx(losses["seg_pnode"], rel=1e-5)


def test_at_panet_takes_three_optimiser_steps_per_iteration(tmp_path):
    from metarobust.seg_experiment import load_seg_volumes
    from metarobust.training.data import TrainingData
    from metarobust.training.engine import Trainer

    cfg = _cfg("seg_at_panet", tmp_path)
    train, _ = load_seg_volumes(cfg)
    trainer = Trainer(cfg, data=TrainingData(train, None, None), progress=False)
    trainer.train_step()
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 3


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        _cfg("seg_panet", tmp_path, "model.name=conv4")
    with pytest.raises(ConfigError, match="seg.ode_solver"):
        _cfg("seg_pnode", tmp_path, "seg.ode_solver=heun")
    with pytest.raises(DataError, match="seg.organ"):
        _cfg("seg_pnode", tmp_path, "seg.organ=heart")


def test_short_training_beats_the_all_background_prediction(tmp_path):
    from metarobust.seg_experiment import train_segmentation

    cfg = _cfg("seg_panet", tmp_path, "train.iterations=40", "model.hidden=8", "name=short")
    result = train_segmentation(cfg, progress=False)
    rows = {r["attack"]: r for r in result["results"]}
    assert rows["all_background"]["dice"] == 0
    assert rows["clean"]["dice"] > 0.15
    assert rows["fgsm"]["dice"] <= rows["clean"]["dice"] + 1e-6
    run = tmp_path / "short"
    assert (run / "seg_overlays.png").is_file() and (run / "report.md").is_file()
    saved = json.loads((run / "seg_eval.json").read_text())
    assert saved["organ"] == "liver" and len(saved["test_volumes"]) == 3


def test_command_line_trains_and_reevaluates_a_run(tmp_path, capsys):
    from metarobust.cli import main

    args = ["seg.image_size=32", "seg.synthetic_volumes=8", "model.hidden=4", "seg.ode_steps=2", "train.iterations=2",
            "seg.attacks=[fgsm]", "seg.eps=[0.03]", f"out_dir={tmp_path}", "name=cli", "device=cpu"]
    assert main(["seg", "train", "configs/seg/synthetic_pnode.yaml", *args, "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(first) == {"all_background", "copy_support", "clean", "fgsm_0.03_query"}
    assert main(["seg", "eval", str(tmp_path / "cli"), "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["clean"] == first["clean"]
    saved = json.loads((tmp_path / "cli" / "seg_eval.json").read_text())
    if importlib.util.find_spec("monai") is not None:  # HD95 beside Dice, per volume and summarised
        clean = next(r for r in saved["results"] if r["attack"] == "clean")
        assert set(clean["hd95_per_volume"]) == set(clean["per_volume"]) and "HD95" in (tmp_path / "cli" /
                                                                                          "report.md").read_text()


def test_a_resumed_segmentation_run_reaches_the_uninterrupted_weights(tmp_path):
    from metarobust.runs import RunDir
    from metarobust.seg_experiment import load_seg_volumes
    from metarobust.training.data import TrainingData
    from metarobust.training.engine import Trainer

    def trainer(name, iterations, resume=False):
        cfg = _cfg("seg_r_pnode", tmp_path, f"name={name}", f"train.iterations={iterations}", "train.checkpoint_every=1")
        train, _ = load_seg_volumes(cfg)
        return Trainer(cfg, RunDir(cfg, resume=resume, tensorboard=False), resume=resume,
                       data=TrainingData(train, None, None), progress=False)

    whole = trainer("whole", 3).fit()
    trainer("part", 2).fit()
    resumed = trainer("part", 3, resume=True)
    assert resumed.step_count == 2 and type(resumed.first_batch).__name__ == "SegEpisodeBatch"
    resumed = resumed.fit()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
