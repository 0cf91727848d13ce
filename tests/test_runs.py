"""Run folders that cannot be corrupted: one process owns a folder, --resume refuses a change that
alters what the checkpoint means and applies the others for real, a fresh start never appends to a
stale attempt, a torn metrics line or an orphaned temporary file does not break a run, Ctrl-C
writes a checkpoint, the NaN advice works when followed, ``metarobust eval`` never rewrites the
run's config, and a checkpoint's config is data (docs/runs.md)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import Killed, assert_same_parameters

from metarobust.cli import main
from metarobust.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from metarobust.experiment import load_config, model_from_checkpoint
from metarobust.runs import RunDir, acquire_lock, load_checkpoint
from metarobust.training.data import load_training_data
from metarobust.training.engine import Trainer
from metarobust.training.recipes import build_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.hidden=8", "meta.meta_batch_size=2", "meta.queries=2", "meta.inner_steps=1",
         "meta.inner_lr=0.4", "meta.test_inner_steps=2", "train.log_every=1", "train.checkpoint_every=2",
         "train.iterations=6", "eval.episodes=10", "eval.batch_size=5", "eval.checks=false", "eval.eps_sweep=[]",
         "recipe=maml"]


@pytest.fixture(scope="module")
def stores():
    cfg = load_config(CONFIGS / "quickstart.yaml", SMALL)
    return load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))


def small_cfg(tmp_path, *extra):
    return load_config(CONFIGS / "quickstart.yaml", [*SMALL, f"out_dir={tmp_path}", *extra])


def killed_at(cfg, stores, step):
    """Train ``cfg`` in its folder and kill it after ``step`` (as a crash would); returns the run."""
    def kill(s, metrics):
        if s == step:
            raise Killed

    run = RunDir(cfg, tensorboard=False)
    with pytest.raises(Killed):
        Trainer(cfg, run, data=stores, progress=False, callbacks=(kill,)).fit()
    run.close()
    return run


# -- --resume: refuse or apply ------------------------------------------------------------------
@pytest.mark.parametrize("change", ["model.hidden=16", "recipe=r_maml", "seed=1", "meta.ways=4", "optim.name=sgd"])
def test_resume_refuses_a_change_of_what_the_checkpoint_means_before_writing_anything(tmp_path, stores, change):
    cfg = small_cfg(tmp_path, "name=r")
    killed_at(cfg, stores, 3)
    before = (tmp_path / "r" / "config.yaml").read_bytes()
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"--resume: .*{key}: run .*, now .*another name="):
        RunDir(small_cfg(tmp_path, "name=r", change), resume=True, tensorboard=False)
    assert (tmp_path / "r" / "config.yaml").read_bytes() == before
    RunDir(cfg, resume=True, tensorboard=False).close()  # the refusal left the folder usable


def test_resume_applies_a_changed_learning_rate_and_weight_decay_to_the_restored_optimizer(tmp_path, stores):
    cfg = small_cfg(tmp_path, "name=lr")
    killed_at(cfg, stores, 3)
    new = small_cfg(tmp_path, "name=lr", "optim.lr=0.0005", "optim.weight_decay=0.01", "train.iterations=8")
    with pytest.warns(UserWarning, match=r"train.iterations 6 -> 8, optim.lr None -> 0.0005"):
        run = RunDir(new, resume=True, tensorboard=False)
    assert run.changes["optim.weight_decay"] == (None, 0.01)
    trainer = Trainer(new, run, resume=True, data=stores, progress=False)
    assert all(g["weight_decay"] == 0.01 and g["lr"] == 0.0005 for g in trainer.optimizer.param_groups)
    trainer.fit()
    assert trainer.step_count == 8
    logged = {m["step"]: m["lr"] for m in run.metrics()}
    assert logged[2] == pytest.approx(1e-3) and all(logged[s] == 0.0005 for s in range(3, 9))
    assert "lr: 0.0005" in (tmp_path / "lr" / "config.yaml").read_text()
    assert load_checkpoint(run.path)["config"]["optim"]["lr"] == 0.0005
    entries = json.loads((run.path / "provenance.json").read_text())["runs"]
    assert [e["resumed_from_step"] for e in entries] == [None, 2]
    assert entries[1]["changes"]["optim.lr"] == {"checkpoint": None, "now": 0.0005}


# -- one owner ----------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX")
def test_a_second_process_cannot_train_into_a_run_folder_and_a_crash_leaves_no_stale_lock(tmp_path):
    cfg = small_cfg(tmp_path, "name=owned")
    (tmp_path / "owned").mkdir()
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: takes the folder as RunDir does, then hangs until killed
        try:
            acquire_lock(tmp_path / "owned")
            os.write(tell, b"owned")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 5) == b"owned"
        with pytest.raises(ConfigError, match=rf"in use by pid {pid} .*another name="):
            RunDir(cfg, tensorboard=False)
    finally:
        os.kill(pid, signal.SIGKILL)  # a crash: the kernel releases the flock
        os.waitpid(pid, 0)
    RunDir(cfg, tensorboard=False).close()


# -- a clean start, a torn line, orphaned temporary files ---------------------------------------
def test_a_fresh_start_without_a_checkpoint_starts_clean_instead_of_appending(tmp_path, stores):
    folder = tmp_path / "stale"
    (folder / "eval").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (folder / "eval" / "old.json").write_text("{}")
    (folder / "events.out.tfevents.1.old").write_text("")
    cfg = small_cfg(tmp_path, "name=stale", "train.iterations=2")
    run = RunDir(cfg, tensorboard=False)
    assert not (folder / "eval").exists() and not list(folder.glob("events.out.tfevents.*.old"))
    Trainer(cfg, run, data=stores, progress=False).fit()
    assert [m["step"] for m in run.metrics()] == [1, 2]


def test_a_torn_last_metrics_line_and_orphaned_temporary_files_do_not_break_resume(tmp_path, stores):
    cfg = small_cfg(tmp_path, "name=torn")
    run = killed_at(cfg, stores, 3)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    orphans = [run.checkpoint_path.parent / ".last.pt.x1y2.tmp", run.path / ".metrics.jsonl.a.tmp"]
    for p in orphans:
        p.write_bytes(b"half")
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]
    resumed = RunDir(cfg, resume=True, tensorboard=False)
    assert not any(p.exists() for p in orphans)
    Trainer(cfg, resumed, resume=True, data=stores, progress=False).fit()
    assert [m["step"] for m in resumed.metrics()] == [1, 2, 3, 4, 5, 6]


def test_resume_appends_to_tensorboard_without_duplicating_steps(tmp_path, stores):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_cfg(tmp_path, "name=tb")

    def kill(s, metrics):
        if s == 3:
            raise Killed

    run = RunDir(cfg)
    with pytest.raises(Killed):
        Trainer(cfg, run, data=stores, progress=False, callbacks=(kill,)).fit()
    run.close()
    resumed = RunDir(cfg, resume=True)
    Trainer(cfg, resumed, resume=True, data=stores, progress=False).fit()
    resumed.close()
    events = EventAccumulator(str(run.path))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


# -- divergence advice and Ctrl-C, followed -----------------------------------------------------
@pytest.fixture
def diverges_above(monkeypatch):
    """Training whose loss turns NaN from step 3 on while the learning rate is above 0.005."""
    reduce = Trainer.reduce_metrics

    def fake(self, sums, count):
        metrics = reduce(self, sums, count)
        if self.lr > 0.005 and self.step_count >= 3:
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(Trainer, "reduce_metrics", fake)


def advised_command(capsys) -> list[str]:
    """The command the last error message advises (its last line), as CLI arguments."""
    err = capsys.readouterr().err.strip().splitlines()
    return shlex.split(err[-1])[1:]


@pytest.mark.parametrize("checkpoint_every", [2, 5])
def test_following_the_nan_advice_works(tmp_path, capsys, diverges_above, checkpoint_every):
    args = ["train", str(CONFIGS / "quickstart.yaml"), *SMALL, f"out_dir={tmp_path}", "name=nan", "optim.lr=0.01",
            f"train.checkpoint_every={checkpoint_every}", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    if checkpoint_every == 2:
        assert "last good checkpoint, step 2" in err and err.rstrip().endswith("optim.lr=0.001 --resume --quiet")
    else:
        assert "before its first checkpoint (due at step 5)" in err and "--resume" not in err.splitlines()[-1]
        assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()
    command = shlex.split(err.strip().splitlines()[-1])[1:]
    assert "optim.lr=0.001" in command and "optim.lr=0.01" not in command
    assert main(command) == 0
    metrics = [m for m in map(json.loads, (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["lr"] == pytest.approx(0.001) for m in metrics if m["step"] > 2)


def test_ctrl_c_writes_a_checkpoint_and_resume_reaches_the_uninterrupted_parameters(tmp_path, stores):
    whole_cfg = small_cfg(tmp_path, "name=whole")
    whole = Trainer(whole_cfg, RunDir(whole_cfg, tensorboard=False), data=stores, progress=False)
    whole.fit()

    def ctrl_c(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = small_cfg(tmp_path, "name=int")
    run = RunDir(cfg, tensorboard=False)
    with pytest.raises(TrainingInterrupted, match=r"after step 3 of 6.*written to .*--resume"):
        Trainer(cfg, run, data=stores, progress=False, callbacks=(ctrl_c,)).fit()
    assert load_checkpoint(run.path)["step"] == 3  # not the periodic one at 2
    resumed = Trainer(cfg, RunDir(cfg, resume=True, tensorboard=False), resume=True, data=stores, progress=False)
    resumed.fit()
    assert_same_parameters(whole.model, resumed.model)


def test_cli_ctrl_c_exits_130_with_a_resume_command_that_works(tmp_path, capsys, monkeypatch):
    end_of_step = Trainer.end_of_step

    def press_ctrl_c(self):
        if self.step_count == 3 and not getattr(self, "_pressed", False):
            self._pressed = True
            os.kill(os.getpid(), signal.SIGINT)
        return end_of_step(self)

    monkeypatch.setattr(Trainer, "end_of_step", press_ctrl_c)
    assert main(["train", str(CONFIGS / "quickstart.yaml"), *SMALL, f"out_dir={tmp_path}", "name=c", "--quiet"]) == 130
    command = advised_command(capsys)
    assert command[-2:] == ["--resume", "--quiet"]
    monkeypatch.setattr(Trainer, "end_of_step", end_of_step)
    assert main(command) == 0
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["step"] == 6


# -- eval and id leave the run's config alone; the checkpoint's config is data -------------------
def test_eval_writes_eval_name_json_beside_the_training_evaluation_and_never_the_config(tmp_path, capsys):
    folder = tmp_path / "ev"
    assert main(["train", str(CONFIGS / "quickstart.yaml"), *SMALL, f"out_dir={tmp_path}", "name=ev",
                 "train.iterations=2", "--quiet"]) == 0
    config, trained = (folder / "config.yaml").read_bytes(), (folder / "eval.json").read_bytes()
    mtime = (folder / "config.yaml").stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["eval", str(folder), "attack.steps=3", "eval.episodes=5", "--quiet"]) == 0
    assert main(["eval", str(folder / "checkpoints" / "last.pt"), "attack.eps=0.0", "--name", "clean", "--quiet"]) == 0
    assert (folder / "config.yaml").read_bytes() == config and (folder / "config.yaml").stat().st_mtime_ns == mtime
    assert (folder / "eval.json").read_bytes() == trained
    result = json.loads((folder / "eval" / "attack.steps=3,eval.episodes=5.json").read_text())
    assert result["overrides"] == ["attack.steps=3", "eval.episodes=5"] and result["attack"]["steps"] == 3
    assert result["episodes"] == 5 and result["manifest"]["episodes"] == 5 and result["interval"] == "episodes"
    assert result["robust_ci95"] >= 0 and result["provenance"]["versions"]["torch"] == torch.__version__
    assert json.loads((folder / "eval" / "clean.json").read_text())["eps"] == 0.0
    report = (folder / "report.md").read_text()
    assert "PGD-10" in report and "| clean |" in report and "| attack.steps=3,eval.episodes=5 |" in report
    assert main(["eval", str(folder), "--name", "../x", "--quiet"]) == 2
    assert "--name '../x' is invalid" in capsys.readouterr().err


def test_a_checkpoint_config_never_downloads_or_points_at_the_training_machine(tmp_path, stores, monkeypatch):
    cfg = small_cfg(tmp_path, "name=dl", "train.iterations=2")
    run = RunDir(cfg, tensorboard=False)
    trainer = Trainer(cfg, run, data=stores, progress=False)
    trainer.fit()
    state = trainer.state_dict()
    elsewhere = tmp_path / "elsewhere"
    state["config"]["data"].update(download=True, root=str(elsewhere / "data"))
    state["config"]["out_dir"] = str(elsewhere / "runs")
    state["config"]["at"]["init"] = str(elsewhere / "init.pt")  # a path on the machine that trained it
    run.save_checkpoint(state)
    seen = []
    from metarobust import experiment
    from metarobust.training import data

    def recorded(c, *args, **kwargs):
        seen.append(c.data.download)
        return load_training_data(c, *args, **kwargs)

    monkeypatch.setattr(experiment, "load_training_data", recorded)
    monkeypatch.setattr(data, "load_training_data", recorded)  # metarobust id imports it when it runs
    config = (run.path / "config.yaml").read_bytes()
    assert main(["eval", str(run.path), "--quiet"]) == 0
    assert main(["eval", str(run.path), "data.download=true", "--quiet"]) == 0
    assert main(["id", str(run.path), "analysis.points=45", "analysis.bootstrap=0", "analysis.mle_neighbors=5",
                 "attack.steps=2", "--quiet"]) == 0
    assert seen == [False, True, False] and not elsewhere.exists()
    assert (run.path / "config.yaml").read_bytes() == config
    loaded, _, _ = model_from_checkpoint(run.path)
    assert loaded.data.download is False and loaded.at.init is None


def test_provenance_records_versions_command_device_and_survives_without_git(tmp_path, stores, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    cfg = small_cfg(tmp_path, "name=prov", "train.iterations=2")
    Trainer(cfg, RunDir(cfg, tensorboard=False), data=stores, progress=False).fit()
    entry = json.loads((tmp_path / "prov" / "provenance.json").read_text())["runs"][0]
    assert entry["git"] is None and entry["device"] == "cpu" and entry["world_size"] == 1
    assert set(entry["versions"]) == {"metarobust", "torch", "torchvision", "numpy", "python"}
    assert entry["command"] and entry["hostname"] and entry["started"].endswith("+00:00")


def test_divergence_in_the_api_names_the_checkpoint_step_and_the_advice(tmp_path, stores):
    cfg = small_cfg(tmp_path, "name=api")
    trainer = Trainer(cfg, RunDir(cfg, tensorboard=False), data=stores, progress=False)

    def poison(step, metrics):
        if step == 3:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    trainer.callbacks = (poison,)
    with pytest.raises(TrainingDiverged, match="lower optim.lr or meta.inner_lr") as info:
        trainer.fit()
    assert info.value.checkpoint_step == 2 and info.value.advice == ["optim.lr=0.0001"]


def test_every_setting_the_nan_advice_names_can_change_on_resume(tmp_path):
    """Each recipe's ``divergence_hint`` names settings to lower; --resume must accept them all."""
    import re

    from metarobust.config import to_dict
    from metarobust.runs import RESUME_APPLIED, resume_changes
    from metarobust.training.recipes import RECIPES

    named = {key for name in RECIPES.names() for key in re.findall(r"\b[a-z_]+\.[a-z_]+\b",
                                                                   RECIPES.get(name, "recipe").divergence_hint)}
    assert named >= {"optim.lr", "meta.inner_lr", "at.amp"} and named <= set(RESUME_APPLIED)
    saved = small_cfg(tmp_path, "optim.lr=0.002")
    changed = small_cfg(tmp_path, "optim.lr=0.0001", "meta.inner_lr=0.1", "at.amp=bf16", "attack.steps=20")
    assert set(resume_changes(to_dict(saved), changed)) == {"optim.lr", "meta.inner_lr", "at.amp", "attack.steps"}
    old = to_dict(saved)
    old["meta"]["meta_lr"] = old["optim"].pop("lr")  # a 0.1 checkpoint: the key has moved since
    assert resume_changes(old, saved) == {}
    assert resume_changes(old, changed)["optim.lr"] == (0.002, 0.0001)


def test_the_runs_doc_lists_every_setting_resume_applies():
    from metarobust.runs import RESUME_APPLIED

    doc = (Path(__file__).resolve().parents[1] / "docs" / "runs.md").read_text()
    table = doc[doc.index("### What `--resume` may change"):doc.index("## When training stops early")]
    missing = [key for key in RESUME_APPLIED if f"`{key}`" not in table and f"`{key}.*`" not in table]
    assert not missing, f"docs/runs.md's table lacks {missing}"
