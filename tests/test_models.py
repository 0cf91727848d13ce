"""Models: registry names build at their dataset sizes, match the published sizes and a peer
implementation, normalise inside, route dual BatchNorms, and ResNet-12 meta-gradients are exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import U64, summed_terms
from torch import nn
from torch.func import functional_call

from metarobust.config import ModelConfig
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.experiment import load_config
from metarobust.meta.execution import meta_backward
from metarobust.meta.functional import functional_forward, params_of
from metarobust.meta.maml import MAML
from metarobust.models import (
    MODELS,
    DualBatchNorm,
    ResNet12,
    bn_route,
    build_model,
    convert_dual_bn,
    strip_aux_bn,
)
from metarobust.models.layers import TaskBatchNorm2d
from metarobust.models.options import INPUT_STATS
from metarobust.models.resnet12 import DropBlock

# name -> (channels, image size, classes, hidden for a small but same-shaped network)
SHAPES = {
    "conv4": (1, 28, 5, 8),
    "resnet12": (3, 84, 5, 4),
    "preact_resnet18": (3, 32, 10, 8),
    "resnet18": (3, 32, 10, 8),
    "wrn34_10": (3, 32, 10, 4),
    "wrn28_10": (3, 32, 10, 4),
    "small_cnn": (1, 28, 10, 64),
}

# Published sizes (millions, as the papers round them) and the exact counts of the reference code.
FULL_SIZE = {
    "preact_resnet18": ((3, 32, 10), 11.17, 11_172_170),  # Wong et al. / Rice et al. code
    "resnet18": ((3, 32, 10), 11.17, 11_173_962),          # kuangliu/pytorch-cifar
    "wrn34_10": ((3, 32, 10), 46.16, 46_160_474),          # TRADES' WRN without its unused sub_block1
    "wrn28_10": ((3, 32, 10), 36.48, 36_479_194),
    "resnet12": ((3, 84, 5), 12.43, 12_427_525),           # MetaOptNet / RFS: "12.4M"
    "small_cnn": ((1, 28, 10), 0.31, 312_202),            # TRADES models/small_cnn.py
}


def small(name: str, **overrides) -> nn.Module:
    channels, size, classes, hidden = SHAPES[name]
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, hidden=hidden, **overrides), channels, classes, size)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- shapes, sizes, names ---------------------------------------------------------------------

def test_every_issue_model_is_registered():
    assert set(SHAPES) <= set(MODELS.names())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_output_and_feature_shapes_at_the_dataset_size(name):
    channels, size, classes, _ = SHAPES[name]
    model = small(name).eval()
    x = torch.rand(4, channels, size, size)
    assert model(x).shape == (4, classes)
    assert model.features(x).shape == (4, model.feature_dim)
    torch.testing.assert_close(model.head(model.features(x)), model(x))


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts_match_the_published_numbers(name):
    (channels, size, classes), millions, exact = FULL_SIZE[name]
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build_model(ModelConfig(name=name), channels, classes, size)
    assert n_params(model) == exact
    assert round(n_params(model) / 1e6, 2) == millions


def test_resnet12_has_the_papers_widths_and_leaky_relu_blocks():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="resnet12"), 3, 5, 84)
    widths = [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    assert widths == [64, 160, 320, 640]
    assert isinstance(model.layer1[0].bn1, TaskBatchNorm2d)  # norm=auto -> batch (MAML)
    model = ResNet12(3, 5, widths=(2, 3, 4, 5)).eval()
    assert model.layer4(model.layer3(model.layer2(model.layer1(torch.rand(1, 3, 84, 84))))).shape \
        == (1, 5, 5, 5)  # 84 -> 42 -> 21 -> 10 -> 5, as RFS


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_named_feature_layers_can_be_hooked(name):
    channels, size, _, _ = SHAPES[name]
    model = small(name).eval()
    layers = getattr(model, "feature_layers", ("encoder",))
    modules = dict(model.named_modules())
    seen = []
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.append(n)) for n in layers]
    model(torch.rand(2, channels, size, size))
    for h in handles:
        h.remove()
    assert seen == list(layers)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "wrn28_10", "resnet12"])
def test_channels_last_gives_the_same_logits(name):
    channels, size, _, _ = SHAPES[name]
    # float64: the two memory formats run different convolution kernels, which round differently
    # by up to summed_terms(model) * u of the logits' scale, ~5e-13 here. (float32 rounds 5e8
    # times coarser: 6e-6 measured on WRN-28's logits of ~40, most of a fixed atol of 1e-5 for
    # a logit near 0.) A layout bug is off by O(1).
    model = small(name, batch_norm="running").eval().double()
    x = torch.rand(3, channels, size, size, dtype=torch.float64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    atol = summed_terms(model) * U64 * float(expected.detach().abs().max())
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected,
                               rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet12"])
def test_bf16_autocast_forward_and_backward(name):
    channels, size, classes, _ = SHAPES[name]
    model = small(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.rand(4, channels, size, size))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    F.cross_entropy(logits.float(), torch.arange(4) % classes).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_resnet18_equals_torchvision_resnet18_with_a_3x3_stem():
    """Independent reference: torchvision's ResNet-18, stem made CIFAR-style, same weights."""
    import torchvision  # a dependency: a broken install fails here rather than skipping
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ours = build_model(ModelConfig(name="resnet18", normalize="none"), 3, 10, 32)
    renamed = {k.replace("downsample", "shortcut").replace("fc.", "head."): v
               for k, v in ref.state_dict().items()}
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    assert set(missing) == {"normalize.mean", "normalize.std"} and not unexpected
    for model in (ref, ours):  # non-trivial running statistics, then compare in eval mode
        torch.manual_seed(1)
        model.train()(torch.rand(4, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


def test_norm_choices_build_the_right_layers():
    kinds = {"batch": TaskBatchNorm2d, "running": nn.BatchNorm2d}
    for norm, layer in kinds.items():
        model = small("resnet12", batch_norm=norm)
        assert isinstance(model.layer2[0].bn2, layer) and isinstance(model.layer2[0].downsample[1], layer)
    assert not any(isinstance(m, (nn.BatchNorm2d, TaskBatchNorm2d))
                   for m in small("wrn28_10", batch_norm="none").modules())
    assert isinstance(small("wrn28_10").bn1, nn.BatchNorm2d)  # auto -> running for AT models
    assert isinstance(small("conv4").encoder[0][1], TaskBatchNorm2d)  # auto -> batch for conv4
    with pytest.raises(ConfigError, match="small_cnn.*no BatchNorm"):
        small("small_cnn", batch_norm="running")


# -- input normalisation ----------------------------------------------------------------------

def test_normalisation_is_the_first_layer():
    """A model with CIFAR-10 statistics inside equals the same weights fed pre-normalised input."""
    inside = small("preact_resnet18", normalize="cifar10").eval()
    outside = small("preact_resnet18", normalize="none").eval()
    outside.load_state_dict({k: v for k, v in inside.state_dict().items() if "normalize" not in k},
                            strict=False)
    x = torch.rand(2, 3, 16, 16)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in INPUT_STATS["cifar10"])
    torch.testing.assert_close(inside(x), outside((x - mean) / std))
    assert not torch.allclose(inside(x), outside(x))


def test_auto_normalisation_follows_the_model_then_the_dataset():
    def stats(name, channels, dataset=None, normalize="auto"):
        _, size, classes, hidden = SHAPES[name]
        m = build_model(ModelConfig(name=name, hidden=hidden, normalize=normalize), channels, classes,
                        size, dataset=dataset)
        return m.normalize.mean.flatten().tolist(), m.normalize.std.flatten().tolist()

    def expected(key, channels):
        mean, std = INPUT_STATS[key]
        return (pytest.approx(list(mean) * (channels // len(mean))),
                pytest.approx(list(std) * (channels // len(std))))

    assert stats("wrn34_10", 3) == expected("cifar10", 3)                 # CIFAR-10 by default
    assert stats("wrn34_10", 3, "cifar100") == expected("cifar100", 3)
    assert stats("resnet12", 3) == expected("mini_imagenet", 3)           # RFS' miniImageNet
    assert stats("resnet12", 3, "cifar_fs") == expected("cifar100", 3)    # RFS' CIFAR-FS
    assert stats("resnet18", 1, "fashion_mnist") == expected("fashion_mnist", 1)
    assert stats("small_cnn", 1, "mnist") == expected("none", 1)          # TRADES: raw pixels
    assert stats("conv4", 1, "omniglot") == expected("half", 1)           # unchanged conv4
    assert stats("wrn34_10", 3, "cifar100", normalize="imagenet") == expected("imagenet", 3)
    with pytest.raises(ConfigError, match="model.normalize='cifar10' has statistics for 3 channels "
                                          "but the images have 1"):
        stats("resnet18", 1, normalize="cifar10")


# -- bad input --------------------------------------------------------------------------------

def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'resnet99'; choose one of"):
        build_model(ModelConfig(name="resnet99"), 3, 10, 32)


@pytest.mark.parametrize("name, size, minimum", [("resnet12", 12, 16), ("small_cnn", 14, 16),
                                                 ("preact_resnet18", 4, 8), ("conv4", 8, 16)])
def test_too_small_image_size_is_a_config_error(name, size, minimum):
    message = rf"data.image_size={size} is too small for model '{name}': it needs at least {minimum}"
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(name=name), SHAPES[name][0], 5, size)


@pytest.mark.parametrize("override, message", [
    (["model.name=resnet12", "data.image_size=12"], r"data.image_size=12 is invalid; expected at least 16"),
    (["model.batch_norm=group"], r"model.batch_norm='group' is invalid; expected auto, batch"),
    (["model.normalize=cifar"], r"model.normalize='cifar' is invalid"),
    (["model.drop_rate=1.5"], r"model.drop_rate=1.5 is invalid"),
])
def test_bad_model_config_fails_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "conv4"])
def test_models_without_dropout_refuse_a_drop_rate(name):
    with pytest.raises(ConfigError, match=f"model.drop_rate=0.3 is not supported by model '{name}'"):
        build_model(ModelConfig(name=name, drop_rate=0.3), 3, 10, 32)


# -- dual BatchNorm (AdvProp) -----------------------------------------------------------------

def dual(name: str = "resnet18") -> nn.Module:
    return convert_dual_bn(small(name))


def running_stats(model: nn.Module, which: str) -> list[torch.Tensor]:
    return [getattr(m, which).running_mean.clone() for m in model.modules() if isinstance(m, DualBatchNorm)]


def test_every_batch_norm_becomes_a_pair():
    plain = small("resnet18")
    model = convert_dual_bn(copy.deepcopy(plain))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert len([m for m in model.modules() if isinstance(m, DualBatchNorm)]) == n_bn > 0
    bn_params = sum(p.numel() for m in plain.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert n_params(model) == n_params(plain) + bn_params  # conv/linear weights stay shared


def test_main_running_stats_never_change_during_auxiliary_passes():
    model = dual().train()
    main_before, aux_before = running_stats(model, "main"), running_stats(model, "aux")
    with bn_route(model, "aux"):
        for _ in range(3):
            model(torch.rand(8, 3, 16, 16) * 0.5 + 0.5)
    for before, after in zip(main_before, running_stats(model, "main")):
        assert torch.equal(before, after)
    assert any(not torch.equal(b, a) for b, a in zip(aux_before, running_stats(model, "aux")))


def test_mix_route_sends_each_half_to_its_own_batch_norms():
    """Main BNs see only the clean half, aux BNs only the adversarial half (AdvProp's step)."""
    model = dual().train()
    reference_clean, reference_adv = copy.deepcopy(model), copy.deepcopy(model)
    clean, adv = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16) * 0.2
    with bn_route(model, "mix"):
        logits = model(torch.cat([clean, adv]))
    with bn_route(reference_clean, "main"):
        expected_clean = reference_clean(clean)
    with bn_route(reference_adv, "aux"):
        expected_adv = reference_adv(adv)
    torch.testing.assert_close(logits, torch.cat([expected_clean, expected_adv]))
    for ours, ref in zip(running_stats(model, "main"), running_stats(reference_clean, "main")):
        torch.testing.assert_close(ours, ref)
    for ours, ref in zip(running_stats(model, "aux"), running_stats(reference_adv, "aux")):
        torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="odd batch of 5"), bn_route(model, "mix"):
        model(torch.rand(5, 3, 16, 16))


def test_the_two_batch_norms_are_independent_parameters():
    model = dual()
    with bn_route(model, "aux"):
        F.cross_entropy(model(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    bn = model.layer1[0].bn1
    assert bn.main.weight.grad is None and bn.aux.weight.grad.abs().sum() > 0
    assert bn.main.weight is not bn.aux.weight
    assert model.conv1.weight.grad.abs().sum() > 0  # shared convolutions learn from both


def test_eval_mode_uses_the_main_batch_norms_and_the_route_is_restored():
    model = dual().train()
    with bn_route(model, "aux"):
        model(torch.rand(16, 3, 16, 16) * 0.3)  # aux statistics now differ from main's
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    deployed = strip_aux_bn(copy.deepcopy(model))
    assert not any(isinstance(m, DualBatchNorm) for m in deployed.modules())
    torch.testing.assert_close(model(x), deployed(x))
    with bn_route(model, "aux"):
        assert not torch.allclose(model(x), deployed(x))
    with pytest.raises(RuntimeError), bn_route(model, "aux"):
        raise RuntimeError("attack failed")
    assert all(m.route == "main" for m in model.modules() if isinstance(m, DualBatchNorm))
    torch.testing.assert_close(model(x), deployed(x))


def test_dual_bn_state_dict_round_trips():
    model = dual().train()
    with bn_route(model, "aux"):
        model(torch.rand(8, 3, 16, 16) * 0.3)
    state = model.state_dict()
    assert "layer1.0.bn1.main.running_mean" in state and "layer1.0.bn1.aux.running_mean" in state
    restored = convert_dual_bn(small("resnet18"))
    restored.load_state_dict(state)
    model.eval(), restored.eval()
    x = torch.rand(3, 3, 16, 16)
    for route in ("main", "aux"):
        with bn_route(model, route), bn_route(restored, route):
            torch.testing.assert_close(restored(x), model(x))


def test_dual_bn_works_with_functional_call():
    model = dual().eval()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with bn_route(model, "aux"):
        torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
        grads = torch.func.grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    assert grads["layer1.0.bn1.main.weight"].abs().sum() == 0
    assert grads["layer1.0.bn1.aux.weight"].abs().sum() > 0


def test_dual_bn_wraps_task_batch_norm_too():
    model = convert_dual_bn(small("resnet12"))
    assert isinstance(model.layer1[0].bn1.main, TaskBatchNorm2d)
    with torch.no_grad():
        model.layer1[0].bn1.aux.bias.fill_(1.0)
    x = torch.rand(4, 3, 84, 84)
    with bn_route(model, "aux"):
        aux_logits = model(x)
    assert not torch.allclose(aux_logits, model(x))


def test_bn_route_rejects_bad_use():
    with pytest.raises(ValueError, match="route='adv' is invalid"), bn_route(dual(), "adv"):
        pass
    with pytest.raises(ValueError, match="no dual BatchNorm layers; wrap it with convert_dual_bn"), \
            bn_route(small("resnet18"), "aux"):
        pass


# -- DropBlock --------------------------------------------------------------------------------

def rfs_block_mask(seeds: torch.Tensor, size: int) -> torch.Tensor:
    """RFS' index arithmetic (``_compute_block_mask``), written as loops: the reference."""
    b, c, h, w = seeds.shape
    mask = torch.zeros(b, c, h + size - 1, w + size - 1)
    for i, j, r, s in seeds.nonzero().tolist():
        mask[i, j, r:r + size, s:s + size] = 1
    return 1 - mask


def test_dropblock_masks_equal_rfs_block_masks():
    seeds = (torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.1).float()
    assert 0 < seeds.sum() < seeds.numel()
    torch.testing.assert_close(DropBlock.keep_mask(seeds, 3), rfs_block_mask(seeds, 3))


def test_dropblock_ramps_up_and_is_off_in_eval():
    torch.manual_seed(0)
    block = DropBlock(0.1, block_size=5, ramp_steps=100).train()
    x = torch.ones(16, 32, 10, 10)
    block.steps.fill_(1)
    early = (block(x) == 0).float().mean()
    block.steps.fill_(10_000)
    late = (block(x) == 0).float().mean()
    assert early < 0.01 and 0.05 < late < 0.15  # about the 0.1 target at the end of the ramp
    assert torch.equal(block.eval()(x), x)
    assert int(block.steps) == 10_001  # counts training passes only


# -- ResNet-12 meta-gradient (float64) --------------------------------------------------------

WAYS, SHOTS, QUERIES, TASKS, SIZE = 3, 2, 2, 2, 16


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def episode_batch() -> EpisodeBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)
    sy = labels.repeat_interleave(SHOTS).expand(TASKS, -1).clone()
    qy = labels.repeat_interleave(QUERIES).expand(TASKS, -1).clone()
    return EpisodeBatch(
        support_x=torch.rand(TASKS, WAYS * SHOTS, 3, SIZE, SIZE, generator=g), support_y=sy,
        query_x=torch.rand(TASKS, WAYS * QUERIES, 3, SIZE, SIZE, generator=g), query_y=qy,
        classes=labels.expand(TASKS, -1).clone(), support_index=torch.zeros_like(sy),
        query_index=torch.zeros_like(qy))


def reference_resnet12(w: dict[str, torch.Tensor], x: torch.Tensor, mean, std) -> torch.Tensor:
    """ResNet-12 written independently from ``torch.nn.functional`` (PyTorch's own batch norm)."""
    def bn(h, key):
        return F.batch_norm(h, None, None, w[key + ".weight"], w[key + ".bias"], training=True)

    x = (x - mean) / std
    for i in range(1, 5):
        p = f"layer{i}.0."
        out = F.leaky_relu(bn(F.conv2d(x, w[p + "conv1.weight"], padding=1), p + "bn1"), 0.1)
        out = F.leaky_relu(bn(F.conv2d(out, w[p + "conv2.weight"], padding=1), p + "bn2"), 0.1)
        out = bn(F.conv2d(out, w[p + "conv3.weight"], padding=1), p + "bn3")
        shortcut = bn(F.conv2d(x, w[p + "downsample.0.weight"]), p + "downsample.1")
        x = F.max_pool2d(F.leaky_relu(out + shortcut, 0.1), 2)
    return F.linear(x.mean(dim=(2, 3)), w["head.weight"], w["head.bias"])


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_resnet12_meta_gradient_matches_a_per_task_autograd_reference(float64, execution):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet12", hidden=2), 3, WAYS, SIZE)  # widths 2-5-10-20
    batch, lr, steps = episode_batch(), 0.3, 2
    mean, std = model.normalize.mean, model.normalize.std

    init = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    total = 0
    for t in range(TASKS):
        w = init
        for _ in range(steps):
            loss = F.cross_entropy(reference_resnet12(w, batch.support_x[t], mean, std), batch.support_y[t])
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {k: v - lr * g for (k, v), g in zip(w.items(), grads)}
        total = total + F.cross_entropy(reference_resnet12(w, batch.query_x[t], mean, std), batch.query_y[t])
    expected = torch.autograd.grad(total / TASKS, list(init.values()))

    maml = MAML(functional_forward(model), lr, steps, first_order=False)

    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return F.cross_entropy(maml.forward(fast, qx), qy), {}

    meta_backward(task, params_of(model), batch, None, execution)
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-11, msg=name)
    if execution == "vmap":
        return
    # Guard: the second-order terms matter here (a first-order gradient would fail the check).
    model.zero_grad()
    first = MAML(functional_forward(model), lr, steps, first_order=True)
    meta_backward(lambda p, sx, sy, qx, qy, n: (F.cross_entropy(first.forward(first.adapt(p, sx, sy), qx), qy), {}),
                  params_of(model), batch, None, "loop")
    assert max(float((p.grad - e).abs().max()) for p, e in zip(model.parameters(), expected)) > 1e-6
