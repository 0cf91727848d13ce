"""Intrinsic-dimension analysis: the estimators recover the dimension of point clouds built to
have it, agree with scikit-dimension (the peer library) to rounding, survive duplicates; hooks
take the right layers (also under MAML fast weights); ``metarobust id`` writes its outputs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from metarobust.analysis import (
    MLE,
    PCADimension,
    PointCloud,
    TwoNN,
    classifier_feature_units,
    dimension_with_error,
    extract_features,
    intrinsic_dimension_of_units,
)
from metarobust.cli import main
from metarobust.config import IDConfig
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError
from metarobust.experiment import load_config
from metarobust.models import Conv4

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N, AMBIENT = 2000, 50


@pytest.fixture
def skdim():
    """scikit-dimension, the peer library of the cross-checks (a test extra): only the tests that
    compare against it skip without it."""
    return pytest.importorskip("skdim", reason="scikit-dimension (test extra) is the cross-check peer")


def embed_linear(z: torch.Tensor, ambient: int, generator: torch.Generator) -> torch.Tensor:
    """``z [n, d]`` mapped into ``ambient`` dimensions by a random orthogonal map."""
    q = torch.linalg.qr(torch.randn(ambient, ambient, generator=generator, dtype=torch.float64))[0]
    return z @ q[:, : z.shape[1]].T


def cloud(kind: str, d: int, seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return embed_linear(torch.randn(n, d, generator=g, dtype=torch.float64), AMBIENT, g)
    if kind == "cube":
        return embed_linear(torch.rand(n, d, generator=g, dtype=torch.float64), AMBIENT, g)
    if kind == "swiss_roll":  # a 2-d sheet rolled up in 3-d, then rotated into 50-d
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
        h = 21 * torch.rand(n, generator=g, dtype=torch.float64)
        return embed_linear(torch.stack([t * torch.cos(t), h, t * torch.sin(t)], 1), AMBIENT, g)
    if kind == "sines":  # a d-cube through a smooth non-linear map: (z, sin(W z + b)) in 50-d
        z = torch.rand(n, d, generator=g, dtype=torch.float64)
        w = 2 * torch.randn(d, AMBIENT - d, generator=g, dtype=torch.float64)
        b = 2 * math.pi * torch.rand(AMBIENT - d, generator=g, dtype=torch.float64)
        return torch.cat([z, torch.sin(z @ w + b)], 1)
    raise ValueError(kind)


# Both estimators underestimate as d grows, and more on the cube (its boundary thins the
# neighbourhoods). Measured at n = 2000 over seeds 0-2 (relative error): TwoNN within 6% except
# the 10-cube (-16..-11%); MLE within 9% except the 5-cube (-11..-10%) and the 10-cube (-20..-19%).
KNOWN = [  # kind, d, TwoNN relative tolerance, MLE relative tolerance
    ("gaussian", 2, 0.1, 0.1), ("gaussian", 5, 0.1, 0.1), ("gaussian", 10, 0.1, 0.12),
    ("cube", 2, 0.1, 0.1), ("cube", 5, 0.1, 0.12), ("cube", 10, 0.2, 0.22),
    ("swiss_roll", 2, 0.1, 0.1), ("sines", 5, 0.1, 0.1),
]


@pytest.mark.parametrize("kind,d,tol_twonn,tol_mle", KNOWN)
def test_estimators_recover_the_dimension_of_clouds_built_to_have_it(kind, d, tol_twonn, tol_mle):
    X = cloud(kind, d)
    shared = PointCloud(X)  # one neighbour search for both
    twonn, mle = TwoNN().fit(shared).dimension_, MLE(n_neighbors=20).fit(shared).dimension_
    assert twonn == pytest.approx(d, rel=tol_twonn), (kind, d, twonn)
    assert mle == pytest.approx(d, rel=tol_mle), (kind, d, mle)


def test_twonn_and_mle_agree_with_scikit_dimension_to_rounding(skdim):
    for i, X in enumerate((cloud("gaussian", 5, seed=1, n=500), cloud("cube", 3, seed=2, n=500),
                           cloud("swiss_roll", 2, seed=3, n=500))):
        x = X.numpy()
        assert TwoNN().fit(X).dimension_ == pytest.approx(skdim.id.TwoNN().fit(x).dimension_, rel=1e-9)
        assert TwoNN(discard_fraction=0.25).fit(X).dimension_ == pytest.approx(
            skdim.id.TwoNN(discard_fraction=0.25).fit(x).dimension_, rel=1e-9)
        ref = skdim.id.MLE().fit(x, n_neighbors=20, comb="mle")
        ours = MLE(n_neighbors=20).fit(X)
        assert ours.dimension_ == pytest.approx(ref.dimension_, rel=1e-9)
        assert ours.dimension_pw_ == pytest.approx(ref.dimension_pw_, rel=1e-9)
        if i == 0:
            mean_ref = skdim.id.MLE().fit(x, n_neighbors=20, comb="mean").dimension_
            assert MLE(n_neighbors=20, combine="mean").fit(X).dimension_ == pytest.approx(mean_ref, rel=1e-9)
            # Levina-Bickel's k-range averages the estimates of each k
            by_k = [skdim.id.MLE().fit(x, n_neighbors=k, comb="mle").dimension_ for k in (5, 6)]
            assert MLE(n_neighbors=(5, 6)).fit(X).dimension_ == pytest.approx(np.mean(by_k), rel=1e-9)


def share_tolerance(n: int, d: int) -> float:
    """How far two float64 computations of the explained-variance shares of ``n`` points in ``d``
    dimensions may differ (``u = 2^-53``, ``eps = 2u``). Each spectrum comes from a product summing
    ``max(n, d)`` terms (covariance ``X^T X``, Gram ``X X^T``; sklearn: an SVD of ``X``), which
    moves every eigenvalue by at most ``max(n, d) u trace`` (Cauchy-Schwarz, then Weyl); centring
    and the eigensolver or SVD add backward errors of about ``n u trace`` more. Divided by the
    trace, with both sides erring, that stays under ``4 (n + d) u = 2 (n + d) eps``."""
    return 2 * (n + d) * float(np.finfo(np.float64).eps)


def anisotropic_cloud(g: torch.Generator) -> torch.Tensor:
    """600 points with 6 directions of decreasing variance, rotated into 40 dimensions."""
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    return embed_linear(torch.randn(600, 6, generator=g, dtype=torch.float64) * scales, 40, g)


def test_pca_dimension_counts_components_like_sklearn():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(4)
    X = anisotropic_cloud(g)
    est = PCADimension(0.9).fit(X)
    ratio = PCA().fit(X.numpy()).explained_variance_ratio_
    assert est.explained_variance_ratio_[:6] == pytest.approx(ratio[:6], abs=share_tolerance(*X.shape))
    assert est.dimension_ == int(np.searchsorted(np.cumsum(ratio), 0.9) + 1)
    # a linear embedding of an isotropic d-cloud: all of its variance in exactly d components
    assert PCADimension(0.999).fit(cloud("gaussian", 7)).dimension_ == 7
    # linear measure on a curved 2-d sheet: the Swiss roll needs all 3 of its ambient directions
    assert PCADimension(0.9).fit(cloud("swiss_roll", 2)).dimension_ == 3
    # more features than points: the Gram-matrix route gives the same spectrum
    wide = embed_linear(torch.randn(80, 30, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 30,
                                                                                                 dtype=torch.float64),
                        300, g)
    wide_ratio = PCA().fit(wide.numpy()).explained_variance_ratio_
    tol = share_tolerance(*wide.shape)
    assert PCADimension(0.9).fit(wide).explained_variance_ratio_[:30] == pytest.approx(wide_ratio[:30], abs=tol)
    # PR = 1 / sum(r^2) for shares r summing to 1: |dPR| <= PR^2 * sum(2 r |dr|) <= 2 PR^2 tol
    reference_pr = wide_ratio.sum() ** 2 / (wide_ratio ** 2).sum()
    assert PCADimension(0.9).fit(wide).participation_ratio_ == pytest.approx(reference_pr,
                                                                            rel=2 * reference_pr * tol)


def test_duplicates_are_dropped_not_fatal():
    X, noisy = noisy_duplicates()
    fitted = TwoNN().fit(noisy)
    assert fitted.n_duplicates_ == 320 and fitted.n_points_ == 1000
    assert fitted.dimension_ == pytest.approx(TwoNN().fit(X).dimension_, rel=1e-12)
    assert fitted.dimension_ == pytest.approx(5, rel=0.1)
    assert math.isfinite(MLE().fit(noisy).dimension_)
    assert MLE().fit(noisy).dimension_ == pytest.approx(MLE().fit(X).dimension_, rel=1e-12)


def noisy_duplicates() -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, X with 300 random rows repeated and one row repeated 20 times, shuffled)``."""
    X = cloud("gaussian", 5, n=1000)
    g = torch.Generator().manual_seed(5)
    copies = X[torch.randint(0, 1000, (300,), generator=g)]
    return X, torch.cat([X, copies, X[:1].repeat(20, 1)])[torch.randperm(1320, generator=g)]


def test_pca_dimension_and_twonn_agree_with_scikit_dimension(skdim):
    """lPCA's 90 % ratio rule counts the components ours does; on de-duplicated rows (it does not
    drop duplicates itself) scikit-dimension's TwoNN equals ours on the duplicated cloud."""
    X = anisotropic_cloud(torch.Generator().manual_seed(4))
    assert PCADimension(0.9).fit(X).dimension_ == skdim.id.lPCA(ver="ratio", alphaRatio=0.9).fit(X.numpy()).dimension_
    _, noisy = noisy_duplicates()
    unique = np.unique(noisy.numpy(), axis=0)
    assert TwoNN().fit(noisy).dimension_ == pytest.approx(skdim.id.TwoNN().fit(unique).dimension_, rel=1e-9)


def test_nearest_distances_are_exact_for_nearly_coincident_points():
    """|a|^2 + |b|^2 - 2ab in float32 cannot resolve a 1e-3 gap at |x| ~ 1e3; ours does."""
    g = torch.Generator().manual_seed(6)
    X = 1000 + torch.randn(300, 20, generator=g)
    X[1] = X[0] + 1e-3
    r = PointCloud(X).knn(2).numpy()
    x = X.double().numpy()
    brute = np.sort(np.linalg.norm(x[:, None] - x[None], axis=2) + np.diag(np.full(300, np.inf)), axis=1)[:, :2]
    np.testing.assert_allclose(r, brute, rtol=1e-8)
    naive = torch.cdist(X, X, compute_mode="use_mm_for_euclid_dist")[0, 1].item()
    assert abs(naive - brute[0, 0]) > 0.5 * brute[0, 0]  # the trap this guards against


def test_subsample_neighbours_equal_a_fresh_search_on_the_subsample():
    X = cloud("cube", 4, n=700)
    shared = PointCloud(X)
    shared.knn(20)
    g = torch.Generator().manual_seed(7)
    u = np.finfo(np.float64).eps / 2
    for share in (0.9, 0.3):
        subset = torch.randperm(700, generator=g)[: int(share * 700)]
        fresh = PointCloud(X[subset]).knn(20).numpy()
        # The two searches centre on different means, so their float64 distances round differently:
        # r^2 = |a|^2 + |b|^2 - 2 a.b over d coordinates is off by at most (d + 2) u (|a| + |b|)^2
        # <= 4 (d + 2) u R^2 (R: the largest centred norm of either centring), and r = sqrt(r^2) by
        # that over 2 r; both sides erring: 4 (d + 2) u R^2 / r. (A wrong neighbour is off by the
        # spacing of neighbours, ~1e-2 here, ten orders of magnitude more.)
        R = max(float((Y - Y.mean(0)).norm(dim=1).max()) for Y in (X, X[subset]))
        bound = 4 * (X.shape[1] + 2) * u * R**2 / fresh
        assert np.all(np.abs(shared.knn(20, subset).numpy() - fresh) <= bound), share


def test_dimension_with_error_is_seeded_and_centred_on_the_estimate():
    X = cloud("gaussian", 6, n=1500)
    mean, std = dimension_with_error(TwoNN(), X, n_boot=10, fraction=0.9, seed=3)
    assert (mean, std) == dimension_with_error(TwoNN(), X, n_boot=10, fraction=0.9, seed=3)
    assert mean == pytest.approx(TwoNN().fit(X).dimension_, rel=0.05) and 0 < std < 0.5
    whole, spread = dimension_with_error(MLE(), X, n_boot=3, fraction=1.0)
    # fraction 1: each sub-sample is all n points in another order, so the per-point terms are the
    # same and only the order of MLE's float64 mean over the points differs: a sum of n positive
    # terms is off by at most (n - 1) u relative, plus a round-off each for the division and the
    # inverse; two such values differ by at most 2 (n + 1) u = (n + 1) eps relative, and so does
    # the std of three of them (<= their range); averaging them adds another eps.
    rounding = (len(X) + 2) * float(np.finfo(np.float64).eps)
    assert spread <= rounding * whole
    assert whole == pytest.approx(MLE().fit(X).dimension_, rel=rounding)
    one, nan = dimension_with_error(PCADimension(), torch.from_numpy(X.numpy()).float(), n_boot=0)
    assert one == PCADimension().fit(X).dimension_ and math.isnan(nan)


def test_bad_parameters_and_bad_points_fail_with_a_clear_error():
    X = cloud("gaussian", 3, n=200)
    with pytest.raises(ConfigError, match=r"TwoNN\(discard_fraction=1.0\).*\[0, 1\)"):
        TwoNN(discard_fraction=1.0).fit(X)
    with pytest.raises(ConfigError, match=r"MLE\(n_neighbors=1\)"):
        MLE(n_neighbors=1).fit(X)
    with pytest.raises(ConfigError, match="variance"):
        PCADimension(variance=0).fit(X)
    with pytest.raises(DataError, match="2-D"):
        TwoNN().fit(torch.rand(10, 3, 4))
    with pytest.raises(DataError, match="NaN"):
        TwoNN().fit(np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 1.0]]))
    with pytest.raises(DataError, match="k=20"):
        MLE(n_neighbors=20).fit(X[:15])
    with pytest.raises(ConfigError, match="fraction"):
        dimension_with_error(TwoNN(), X, n_boot=5, fraction=1.5)
    for bad, field in (("analysis.points=2", "analysis.points"), ("analysis.estimators=[twonn,danco]",
                                                                   "analysis.estimators"),
                       ("analysis.fraction=0", "analysis.fraction")):
        with pytest.raises(ConfigError, match=field):
            load_config(CONFIGS / "quickstart.yaml", [bad])


def test_hooks_take_the_named_layers_also_under_fast_weights():
    torch.manual_seed(0)
    model = Conv4(1, 5, 28, hidden=8)
    model.train()
    x = torch.rand(12, 1, 28, 28)
    feats = extract_features(model, x)
    # Conv-4's last block *is* the penultimate features: counted once
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "encoder.0": (12, 8 * 14 * 14), "encoder.1": (12, 8 * 7 * 7), "encoder.2": (12, 8 * 3 * 3),
        "penultimate": (12, 8)}
    with torch.no_grad():
        torch.testing.assert_close(feats["encoder.0"], model.encoder[0](model.normalize(x)).flatten(1))
        torch.testing.assert_close(feats["penultimate"], model.features(x))
    assert model.training and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # fast weights: the same hooks see functional_call's parameters, not the module's own
    fast = {k: v + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
    got = extract_features(model, x, ["encoder.1", "penultimate"],
                           forward=lambda inp: functional_call(model, fast, (inp,)))
    with torch.no_grad():
        expected = functional_call(model.encoder, {k[len("encoder."):]: v for k, v in fast.items()
                                                   if k.startswith("encoder.")},
                                   (model.normalize(x),)).flatten(1)
    torch.testing.assert_close(got["penultimate"], expected)
    assert not torch.allclose(got["penultimate"], feats["penultimate"])
    with pytest.raises(ConfigError, match="no layer 'encodr.1'; did you mean 'encoder.1'"):
        extract_features(model, x, ["encodr.1"])

    class TinyResNet(torch.nn.Module):  # stem, stages, final norm, head: the stages are the blocks
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.layer1 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.layer2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.bn = torch.nn.BatchNorm2d(6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, inp):
            return self.head(self.bn(self.layer2(self.layer1(self.conv1(inp)))).mean(dim=(2, 3)))

    shapes = {k: tuple(v.shape) for k, v in extract_features(TinyResNet(), torch.rand(5, 1, 8, 8)).items()}
    assert shapes == {"layer1": (5, 4 * 8 * 8), "layer2": (5, 6 * 4 * 4), "penultimate": (5, 6)}


def test_plain_classifier_units_pool_distinct_images_clean_and_adversarial():
    torch.manual_seed(0)
    model = Conv4(1, 4, 16, hidden=4, batch_norm="none")
    images = torch.randint(0, 256, (70, 1, 16, 16), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(70) % 4, ["a", "b", "c", "d"], "toy/test")
    cfg = load_config(CONFIGS / "quickstart.yaml", ["attack.steps=2"])
    analysis = IDConfig(layers=["encoder.1", "penultimate"], points=50, bootstrap=2, mle_neighbors=5)
    report = intrinsic_dimension_of_units(classifier_feature_units(model, store, batch_size=32), model,
                                          analysis, cfg.attack)
    assert report.points == 50 and list(report.layers) == ["encoder.1", "penultimate"]
    assert report.layers["encoder.1"].features == 4 * 4 * 4
    for cond in ("clean", "adversarial"):
        for est in ("twonn", "mle", "pca"):
            mean, std = report.estimates()["penultimate"][cond][est]
            assert 0 < mean <= 4 and std >= 0  # at most the 4 penultimate features
    with pytest.warns(UserWarning, match="fewer than analysis.points"):
        clean_only = intrinsic_dimension_of_units(classifier_feature_units(model, store), model,
                                                  IDConfig(points=100, bootstrap=0, estimators=["twonn"]), None)
    assert clean_only.points == 70 and set(clean_only.layers["penultimate"].estimates) == {"clean"}
    payload = json.loads(json.dumps(clean_only.as_dict(), allow_nan=False))  # no NaN in id.json
    assert payload["layers"]["penultimate"]["estimates"]["clean"]["twonn"]["std"] is None


def test_cli_id_writes_json_plot_and_a_headline(tmp_path, capsys):
    from metarobust.runs import RunDir
    from metarobust.training.data import load_training_data
    from metarobust.training.engine import Trainer
    from metarobust.training.recipes import build_recipe

    small = ["recipe=maml", "meta.first_order=true", "model.hidden=8", "meta.meta_batch_size=2",
             "meta.queries=4", "meta.inner_steps=1", "meta.inner_lr=0.4", "meta.test_inner_steps=2",
             "train.iterations=2", "train.log_every=1", "eval.episodes=12", "eval.batch_size=6",
             f"out_dir={tmp_path}", "name=tiny"]
    cfg = load_config(CONFIGS / "quickstart.yaml", small)
    Trainer(cfg, RunDir(cfg, tensorboard=False), data=load_training_data(cfg, build_recipe(cfg), torch.device("cpu")),
            progress=False).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no frozen manifest for this tiny episode shape
        assert main(["id", str(tmp_path / "tiny"), "analysis.points=45", "analysis.bootstrap=2",
                     "analysis.mle_neighbors=5", "attack.steps=2", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(out[-1])
    payload = json.loads((tmp_path / "tiny" / "id.json").read_text())
    assert (tmp_path / "tiny" / "id.png").stat().st_size > 10_000
    assert headline["points"] == payload["points"] == 45  # 12 episodes x 20 queries, distinct images
    assert list(payload["layers"]) == ["encoder.0", "encoder.1", "encoder.2", "penultimate"]
    for layer in payload["layers"].values():
        for cond in ("clean", "adversarial"):
            assert set(layer["estimates"][cond]) == {"twonn", "mle", "pca"}
            assert all(math.isfinite(v["mean"]) and v["std"] >= 0 for v in layer["estimates"][cond].values())
    assert payload["attack"]["steps"] == 2 and payload["recipe"] == "maml" and payload["bootstrap"] == 2
    assert any(line.startswith("penultimate") for line in out)
    assert main(["id", str(tmp_path / "tiny"), "analysis.layers=[encoder.9]", "--quiet"]) == 2
