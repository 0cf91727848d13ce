"""scripts/reproduce_at.py without training: its defaults, the paired contrasts it reports from
per-point verdicts, and its refusal to reuse a run made with other settings."""

from __future__ import annotations

import pytest
from conftest import load_script

from metarobust.config import to_yaml
from metarobust.errors import ConfigError
from metarobust.evaluation.result import encode_verdicts


@pytest.fixture(scope="module")
def study():
    return load_script("reproduce_at")


def test_cpu_defaults_score_every_method_on_the_same_points_with_selection(study, tmp_path):
    args = study.parse_args(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert (args.points, args.select, args.holdout, args.threads, args.awp) == (1000, "best", 500, 1, False)
    shared = study.shared_overrides(args)
    assert "eval.points=1000" in shared and "at.select=best" in shared and "attack.steps=20" in shared
    assert f"train.checkpoint_every={args.train_size // 128}" in shared  # a checkpoint every epoch
    assert study.method_overrides(args, "ltd") == ["name=ltd", f"ltd.teacher={tmp_path / 'out' / 'trades'}"]
    awp = study.parse_args(["--data-root", str(tmp_path), "--awp"])
    assert "awp.gamma=0.005" in study.method_overrides(awp, "trades") and "awp.warmup=0" in \
        study.method_overrides(awp, "ltd") and study.method_overrides(awp, "pgd_at") == ["name=pgd_at"]
    with pytest.raises(SystemExit):
        study.parse_args(["--data-root", str(tmp_path), "--methods", "ltd"])  # ltd needs trades' model


def test_contrasts_are_paired_on_the_shared_points(study):
    def record(clean, robust):
        v = {"clean": encode_verdicts(clean), "pgd20": encode_verdicts(robust), "cascade": encode_verdicts(robust)}
        return {"verdicts": v}

    import torch

    n = 200
    natural = record(torch.arange(n) < 120, torch.zeros(n, dtype=torch.bool))
    pgd_at = record(torch.arange(n) < 90, torch.arange(n) < 40)
    trades = record(torch.arange(n) < 100, torch.arange(n) < 42)
    out = study.contrasts({"natural": natural, "pgd_at": pgd_at, "trades": trades})
    assert [(c["a"], c["b"]) for c in out] == [("pgd_at", "natural"), ("trades", "pgd_at")]
    first, second = out
    assert first["cascade"]["difference"] == pytest.approx(0.2) and first["verdict"] == "separated"
    assert second["cascade"]["only_a"] == 2 and second["verdict"] == "not separated"
    assert first["clean"]["difference"] == pytest.approx(-0.15) and first["clean"]["verdict"] == "separated"


def test_a_run_made_with_other_settings_is_refused(study, tmp_path):
    from metarobust.experiment import load_config

    run = tmp_path / "pgd_at"
    run.mkdir()
    cfg = load_config(None, ["recipe=pgd_at", "at.epochs=3", "optim.schedule=constant", f"out_dir={tmp_path}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    study.check_same_settings(run, load_config(None, ["recipe=pgd_at", "at.epochs=3", "optim.schedule=constant", "device=cpu"]))  # where
    with pytest.raises(ConfigError, match=r"at.epochs: run 3, now 4.*--fresh"):
        study.check_same_settings(run, load_config(None, ["recipe=pgd_at", "at.epochs=4", "optim.schedule=constant"]))
