"""scripts/shots_study.py end to end at a tiny scale (embedded glyphs): the grid with a replicate
seed and per-recipe overrides, the cascade on a subset of the frozen episodes, reuse of finished
learners, and the claims' arithmetic (verdicts from intervals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_module():
    return load_script("shots_study")  # its dataclasses look their module up in sys.modules


def test_verdicts_follow_the_intervals(study_module):
    verdict = study_module.verdict
    assert verdict([(0.05, 0.02), (0.04, 0.03)]) == "yes"
    assert verdict([(-0.05, 0.02)]) == "no"
    assert verdict([(0.05, 0.02), (0.01, 0.03)]) == "not significant"  # the second seed straddles 0
    assert verdict([(0.05, 0.02), (-0.05, 0.02)]) == "not significant"  # the seeds disagree
    assert verdict([(-0.01, 0.005)], threshold=-0.02) == "yes"  # a loss the interval keeps above -2 points
    assert verdict([(-0.05, 0.01)], threshold=-0.02) == "no"
    assert verdict([]) == "not significant"
    d, h = study_module.difference({"a": 0.7, "h": 0.03}, {"a": 0.6, "h": 0.04}, lambda r: r["a"], lambda r: r["h"])
    assert d == pytest.approx(0.1) and h == pytest.approx(0.05)  # half-widths add in quadrature


def test_a_tiny_study_runs_resumes_and_answers(study_module, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["configs/meta/shots_study_glyphs.yaml", "--out", str(out), "--iterations", "2", "--episodes", "4",
            "--cascade-episodes", "2", "--train-shots", "1,3", "--inner-steps", "1", "--recipes", "its_maml,maml",
            "--replicate-seeds", "1", "--points", "40", "--bootstrap", "2", "--quiet", "--threads", "1",
            "--results", str(tmp_path / "summary.json"),
            "model.hidden=8", "meta.queries=3", "meta.test_inner_steps=1", "eval.checks=false", "attack.steps=2",
            "eval.batch_size=2"]
    assert study_module.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = {"its_maml_k1_s1", "its_maml_k3_s1", "maml_k1_s1", "maml_k3_s1",
                "its_maml_k1_s1_seed1", "its_maml_k3_s1_seed1", "maml_k1_s1_seed1", "maml_k3_s1_seed1"}
    assert set(last["runs"]) == expected
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    # The replicate seed trained from another seed on the same frozen episodes.
    assert rows["maml_k1_s1_seed1"]["seed"] == 1 and rows["maml_k1_s1"]["seed"] == 0
    assert rows["maml_k1_s1_seed1"]["episodes"] == rows["maml_k1_s1"]["episodes"] == 4
    for r in rows.values():
        assert r["cascade_episodes"] == 2 and 0 <= r["cascade_acc"] <= r["cascade_clean_acc"] <= 1
        assert "penultimate" in r["id"]
    assert rows["its_maml_k1_s1"]["run_recipe"] == "r_maml" and rows["its_maml_k3_s1"]["run_recipe"] == "its_maml"
    answers = summary["answers"]
    assert answers["robust_learner"] == "its_maml" and answers["seeds"] == [0, 1]
    clean = answers["claims"]["more_shots_raise_clean_accuracy"]
    assert [s["seed"] for s in clean["per_seed"]] == [0, 1]
    for seed_answer in clean["per_seed"]:  # the difference is recomputed from the rows
        tail = "" if seed_answer["seed"] == 0 else "_seed1"
        hi, lo = rows[f"its_maml_k3_s1{tail}"], rows[f"its_maml_k1_s1{tail}"]
        assert seed_answer["difference"] == pytest.approx(100 * (hi["clean_acc"] - lo["clean_acc"]), abs=1e-3)
        assert seed_answer["ci95"] == pytest.approx(100 * math.hypot(hi["clean_ci95"], lo["clean_ci95"]), abs=1e-3)
    assert {c["verdict"] for c in answers["claims"].values()} <= {"yes", "no", "not significant"}
    for name in ("tradeoff.png", "accuracy_vs_shots.png", "id_vs_shots.png", "results.md"):
        assert (out / name).is_file()
    # A second call reuses every learner (eval.json, eval/apgd_ce_t.json, id.json) and trains nothing.
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/last.pt")}
    assert study_module.main(argv) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["reused"] for r in again["rows"])
    assert [r["cascade_acc"] for r in again["rows"]] == [r["cascade_acc"] for r in summary["rows"]]
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/last.pt")}


def test_per_recipe_overrides_and_bad_study_keys(study_module, tmp_path):
    import argparse

    from metarobust.errors import ConfigError

    flags = argparse.Namespace(recipes=None, train_shots=None, inner_steps=None, layers=None, iterations=None,
                               episodes=None, points=None, bootstrap=None, test_shots=None, seed=None, name=None,
                               replicate_seeds=None, cascade_episodes=None)
    study, base = study_module.load_study(ROOT / "configs/meta/shots_study_glyphs.yaml", flags)
    study.recipes = ["r_maml", "maml"]
    study.overrides = {"r_maml": ["robust.form=trades", "robust.weight=5.0"]}
    cfg = study_module.run_config(study, base, "r_maml", 1, 1, tmp_path, tmp_path / "e.json", ["robust.weight=2.0"])
    assert cfg.robust.form == "trades" and cfg.robust.weight == 2.0  # the command line wins over the study
    cfg = study_module.run_config(study, base, "maml", 1, 1, tmp_path, tmp_path / "e.json", [], seed=3)
    assert cfg.seed == 3 and cfg.name == "maml_k1_s1_seed3" and cfg.robust.form == "ce"
    bad = tmp_path / "bad.yaml"
    bad.write_text("study:\n  replicate_seed: [1]\ndata:\n  dataset: glyphs\n")
    with pytest.raises(ConfigError, match="replicate_seed"):
        study_module.load_study(bad, flags)


def test_a_committed_summary_stands_in_for_lost_run_folders(study_module, tmp_path, capsys):
    """--reuse-results: a second seed joins a study whose run folders are gone; the first seed's
    rows come from the summary, only the new learners train, and a summary of another study is
    refused before any training."""
    common = ["configs/meta/shots_study_glyphs.yaml", "--iterations", "2", "--episodes", "4", "--cascade-episodes", "0",
              "--train-shots", "1,3", "--inner-steps", "1", "--recipes", "maml", "--points", "40", "--bootstrap", "2",
              "--quiet", "--threads", "1", "model.hidden=8", "meta.queries=3", "meta.test_inner_steps=1",
              "eval.checks=false", "attack.steps=2", "eval.batch_size=2"]
    first = tmp_path / "first.json"
    assert study_module.main([*common, "--out", str(tmp_path / "a"), "--replicate-seeds", "", "--results", str(first)]) == 0
    committed = json.loads(first.read_text())
    assert len(committed["manifest_sha256"]) == 64

    both = tmp_path / "both.json"
    out = tmp_path / "b"  # a fresh folder: the first study's run folders are not there
    assert study_module.main([*common, "--out", str(out), "--replicate-seeds", "1", "--reuse-results", str(first),
                              "--results", str(both)]) == 0
    capsys.readouterr()
    rows = {r["name"]: r for r in json.loads(both.read_text())["rows"]}
    assert set(rows) == {"maml_k1_s1", "maml_k3_s1", "maml_k1_s1_seed1", "maml_k3_s1_seed1"}
    for name, old in ((r["name"], r) for r in committed["rows"]):
        assert rows[name]["reused"] == "results file" and rows[name]["clean_acc"] == old["clean_acc"]
    assert not (out / "runs" / "maml_k1_s1").exists()  # nothing retrained
    assert (out / "runs" / "maml_k1_s1_seed1" / "eval.json").is_file()

    from metarobust.errors import ConfigError

    changed = [*common, "--out", str(tmp_path / "c"), "--iterations", "3", "--reuse-results", str(first)]
    assert study_module.main(changed) == 2
    assert "iterations" in capsys.readouterr().err
    assert not (tmp_path / "c" / "runs").exists()
    with pytest.raises(ConfigError, match="not a shots-study summary"):
        study_module.reusable_rows(tmp_path / "missing.json", None, {}, "")
