"""Fixtures shared by the test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist each worker gets one thread: two workers with two threads each on a
# 2-core machine oversubscribe the cores and run several times slower than either alone.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The staged, read-only public datasets beside the checkout (``../shared/data``)."""
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """``scripts/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``, which
    the dataclasses of a script need to find their module)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def private_user_episodes(tmp_path_factory):
    """Point ``$METAROBUST_EPISODES`` at an empty folder: the default manifest lookup searches the
    user's frozen episodes after the shipped ones, and a test must not read or write the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("METAROBUST_EPISODES", str(tmp_path_factory.mktemp("user_episodes")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (staged real datasets); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"staged datasets not found at {SHARED_DATA} (../shared/data beside the "
                    f"checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist16(shared_data):
    """Real MNIST (``../shared/data/mnist``) resized to 16x16, for small standard-training tests:
    ``(train store, test store, root)``, loaded once per session; skipped without the idx files."""
    from metarobust.config import DataConfig
    from metarobust.data.datasets import load_split

    root = shared_data / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST idx files not found in {root}")
    cfg = DataConfig(dataset="mnist", root=str(root), image_size=16)
    return load_split(cfg, "train"), load_split(cfg, "test"), str(root)


class Killed(Exception):
    """Raised by a callback to kill a run mid-training (as a crash or a pre-empted job would)."""


def kill_and_resume(make_cfg, data, kill_at: int, checkpoint_at: int):
    """The exact-resume experiment every engine test runs: train ``make_cfg("whole")`` without
    interruption; train ``make_cfg("killed")``, kill it after step ``kill_at`` (its last checkpoint
    is at ``checkpoint_at``), resume it from the checkpoint and let it finish.

    Returns ``(whole, resumed, whole_run, killed_run)``: the two finished trainers and run folders,
    for the caller to compare (parameters, recipe state, metrics must all be equal).
    """
    from metarobust.runs import RunDir, load_checkpoint
    from metarobust.training.engine import Trainer

    cfg = make_cfg("whole")
    whole_run = RunDir(cfg, tensorboard=False)
    whole = Trainer(cfg, whole_run, data=data, progress=False)
    whole.fit()

    def kill(step, metrics):
        if step == kill_at:
            raise Killed

    cfg_b = make_cfg("killed")
    killed_run = RunDir(cfg_b, tensorboard=False)
    with pytest.raises(Killed):
        Trainer(cfg_b, killed_run, data=data, progress=False, callbacks=(kill,)).fit()
    assert load_checkpoint(killed_run.path)["step"] == checkpoint_at  # the kill came before the next one
    resumed = Trainer(cfg_b, RunDir(cfg_b, resume=True, tensorboard=False), resume=True, data=data, progress=False)
    assert resumed.step_count == checkpoint_at
    resumed.fit()
    return whole, resumed, whole_run, killed_run


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit-identical state dicts (resume is exact: same kernels, same order, same draws)."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def toy_classifier(points_per_class: int = 50, classes: int = 4, noise: float = 0.15, hidden: int = 32,
                   steps: int = 200):
    """A small MLP on 1x8x8 noisy class prototypes, accurate on clean data and not robust (so
    attacks have something to break): ``(model in eval mode, x [N, 1, 8, 8], y [N])``, seeded."""
    from torch import nn
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(classes, 1, 8, 8, generator=g)
    y = torch.arange(classes).repeat(points_per_class)
    x = (prototypes[y] + noise * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


@pytest.fixture(scope="module")
def toy():
    """The black-box tests' target: :func:`toy_classifier` on its first 24 points, rounded to
    8-bit images as datasets store them, keeping those it classifies correctly:
    ``(model, x [M, 1, 8, 8], y [M])``."""
    model, x, y = toy_classifier()
    x, y = torch.round(x[:24] * 255) / 255, y[:24]
    keep = model(x).argmax(-1) == y
    return model, x[keep], y[keep]


def prototype_classifier(points: int = 128, classes: int = 10):
    """An accurate MLP with batch norm (eval mode) on noisy 1x8x8 class prototypes and ``points``
    fresh test points, seeded: ``(model, x [points, 1, 8, 8], y [points])``. At L-inf 0.16,
    L2 1.0 or L1 4.0 about half of the points are robust (the model of ``tests/test_apgd.py``)."""
    from torch import nn
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(classes, 1, 8, 8, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat(n // classes + 1)[:n]
        return (prototypes[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y

    x_train, y_train = sample(600)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return (model, *sample(points))


class TinyBN(torch.nn.Module):
    """A conv net with BatchNorm on 1x8x8 inputs, 5 classes: train and eval modes give different
    outputs; its weights with dim > 1 (what AWP perturbs) are the conv's and the linear's."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        return self.body(x)
