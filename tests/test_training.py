"""The engine end to end: a short real run learns, a killed run resumes to the same result,
a NaN stops training and keeps the last good checkpoint, and the CLI drives it all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_parameters, kill_and_resume

from metarobust.cli import main
from metarobust.errors import ConfigError, TrainingDiverged
from metarobust.experiment import load_config, train_and_evaluate
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import load_training_data
from metarobust.training.engine import Trainer
from metarobust.training.recipes import build_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SMALL = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.inner_steps=1",
         "meta.inner_lr=0.4", "meta.test_inner_steps=2", "train.log_every=1",
         "train.checkpoint_every=2", "train.iterations=6", "eval.episodes=10", "eval.batch_size=5"]


@pytest.fixture(scope="module")
def stores():
    cfg = load_config(CONFIGS / "quickstart.yaml", SMALL)
    return load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))


def small_cfg(tmp_path, *extra):
    return load_config(CONFIGS / "quickstart.yaml", [*SMALL, f"out_dir={tmp_path}", *extra])


def test_killed_run_resumes_to_the_same_parameters_and_metrics(tmp_path, stores):
    whole, resumed, whole_run, run = kill_and_resume(
        lambda name: small_cfg(tmp_path, f"name={name}", "recipe=r_maml"), stores, kill_at=3, checkpoint_at=2)
    assert_same_parameters(whole.model, resumed.model)
    assert whole_run.metrics() == run.metrics()
    assert [m["step"] for m in run.metrics()] == [1, 2, 3, 4, 5, 6]


def test_run_folder_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path, stores):
    cfg = small_cfg(tmp_path, "name=once", "train.iterations=2")
    Trainer(cfg, RunDir(cfg, tensorboard=False), data=stores, progress=False).fit()
    with pytest.raises(ConfigError, match="--resume"):
        RunDir(cfg)
    with pytest.raises(ConfigError, match="no checkpoint"):
        RunDir(small_cfg(tmp_path, "name=never"), resume=True)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, stores):
    cfg = small_cfg(tmp_path, "name=diverge", "recipe=maml")
    run = RunDir(cfg, tensorboard=False)
    trainer = Trainer(cfg, run, data=stores, progress=False)

    def poison(step, metrics):
        if step == 3:  # after the checkpoint of step 2
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    trainer.callbacks = (poison,)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    state = load_checkpoint(run.path)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_short_real_training_run_beats_chance_by_a_margin(tmp_path):
    """Plain MAML, Conv-4 (16 filters), 120 meta-updates on the embedded glyphs, scored on
    held-out classes: 5-way 1-shot chance is 20%."""
    cfg = load_config(CONFIGS / "quickstart.yaml", [
        f"out_dir={tmp_path}", "name=learn", "recipe=maml", "model.hidden=16", "meta.queries=5",
        "train.iterations=120", "train.log_every=20", "train.checkpoint_every=60", "eval.episodes=60"])
    summary = train_and_evaluate(cfg, progress=False)
    assert summary["clean_acc"] > 0.45, summary
    run = Path(summary["run"])
    for name in ("config.yaml", "metrics.jsonl", "report.md", "eval.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "eval.json").read_text())["episodes"] == 60


def test_cli_eval_rescores_a_run_with_overrides(tmp_path, capsys, stores):
    cfg = small_cfg(tmp_path, "name=cli", "train.iterations=2")
    Trainer(cfg, RunDir(cfg, tensorboard=False), data=stores, progress=False).fit()
    assert main(["eval", str(tmp_path / "cli"), "attack.eps=0.0", "eval.episodes=10", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eps"] == 0.0 and out["robust_acc"] == pytest.approx(out["clean_acc"])
    assert main(["eval", str(tmp_path / "cli"), "attack.eps=0.5", "eval.episodes=10",
                 "eval.check_points=20", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["robust_acc"] < 0.05  # a huge eps breaks everything: no gradient masking
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 2


def test_cli_lists_registries_and_describes_data(capsys):
    assert main(["list", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines} >= {"maml", "adversarial_querying", "r_maml"}
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # every name has a description
    assert main(["data", "info", "glyphs"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["test"]["classes"] >= 20
