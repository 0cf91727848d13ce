"""scripts/blackbox_evidence.py: the few-shot (Omniglot) pipeline end to end at ``--tiny``.

Reads the staged small Omniglot (``../shared/data/omniglot``) and is skipped when it is absent.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def evidence_script():
    return load_script("blackbox_evidence")


def test_omniglot_tiny_gives_plain_and_mcg_rows_within_budget_on_a_few_shot_target(shared_data, tmp_path):
    root = shared_data / "omniglot"
    if not any(root.glob("images_background*")):
        pytest.skip(f"staged Omniglot not found in {root}")
    script = evidence_script()
    results = tmp_path / "blackbox_omniglot.json"
    result = script.main(["--dataset", "omniglot", "--tiny", "--out", str(tmp_path / "study"),
                          "--results", str(results), "--data-root", str(root)])
    assert json.loads(results.read_text()) == result
    target = result["target"]
    assert target["kind"] == "fewshot" and target["recipe"] == "rfs" and target["learner"] == "rfs"
    assert target["adapted_per_episode"]
    assert (target["ways"], target["shots"], target["episodes_attacked"]) == (5, 1, 1)
    assert result["points"] == 5 * target["queries"] and result["generator"]["episodes"] == 2
    budget = result["threat"]["budget"]
    assert set(result["attacks"]) == set(script.ATTACKS)
    for name, row in result["attacks"].items():
        for kind in ("plain", "mcg"):
            stats = row[kind]
            assert stats["attacked"] > 0, (name, kind)
            assert stats["mean_queries_all"] <= budget, (name, kind)
            assert stats["mean_queries"] is None or 1 <= stats["mean_queries"] <= budget, (name, kind)


def test_scale_flags_of_the_other_kind_of_target_are_refused(capsys):
    script = evidence_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "omniglot", "--points", "10", "--data-root", "."])
    assert "--points does not apply to --dataset omniglot" in capsys.readouterr().err
