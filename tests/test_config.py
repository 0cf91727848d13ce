"""Configs: YAML + dotted overrides, and every bad value fails early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from metarobust.cli import main
from metarobust.errors import ConfigError
from metarobust.experiment import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads(tmp_path):
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        if path.stem.startswith("shots_study"):  # a study file: base config + `study:` (scripts/shots_study.py)
            continue
        if path.stem.startswith("mcg_train"):  # `metarobust blackbox-train`: surrogates named at the command line
            from metarobust.blackbox.mcg.fit import load_train_config

            load_train_config(path, check=False)
            continue
        if path.parent.name == "blackbox":  # `metarobust blackbox` configs: a run and its attacks
            from metarobust.blackbox.run import load_blackbox_config

            stand_in = tmp_path / "file.pt"  # an MCG section names a generator and surrogate runs to be made
            stand_in.write_bytes(b"")
            load_blackbox_config(path, [f"mcg.generator={stand_in}", f"mcg.surrogates=[{stand_in}]"]
                                 if path.stem.startswith("mcg_") else [])
            continue
        load_config(path)


def test_each_first_order_twin_differs_from_its_paper_config_only_in_the_order():
    """The ``*_fo.yaml`` configs reproduce the released reference codes (first order in effect):
    the same experiment as the paper config beside them, with ``meta.first_order`` set."""
    from metarobust.config import to_dict

    twins = sorted(CONFIGS.rglob("*_fo.yaml"))
    assert len(twins) >= 4
    for twin in twins:
        paper = load_config(twin.with_name(twin.name.replace("_fo.yaml", ".yaml")))
        first = load_config(twin)
        assert (paper.meta.first_order, first.meta.first_order) == (False, True), twin.name
        first.meta.first_order, first.name = False, paper.name
        assert to_dict(first) == to_dict(paper), twin.name


def test_dotted_overrides_win_over_the_file():
    cfg = load_config(CONFIGS / "quickstart.yaml", ["meta.train_shots=5", "attack.eps=0.05", "recipe=maml"])
    assert (cfg.meta.train_shots, cfg.meta.test_shots, cfg.attack.eps, cfg.recipe) == (5, 1, 0.05, "maml")


@pytest.mark.parametrize("override, message", [
    (["meta.train_shot=5"], r"unknown config key 'meta.train_shot'; did you mean 'meta.train_shots'"),
    (["optimiser.lr=1"], r"unknown config key 'optimiser'"),
    (["meta.ways=five"], r"meta.ways"),
    (["attack.eps=-0.1"], r"attack.eps=-0.1 is invalid; expected .*not negative"),
    (["meta.ways=1"], r"meta.ways=1 is invalid"),
    (["recipe=maaml"], r"recipe: unknown recipe 'maaml'; choose one of"),
    (["model.name=resnet99"], r"model.name: unknown model"),
    (["data.dataset=imagenet"], r"data.dataset: unknown dataset"),
    (["meta.execution=gpu"], r"meta.execution='gpu' is invalid; expected auto, loop or vmap"),
    (["meta.queries"], r"must look like key=value"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "quickstart.yaml", override)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    code = main(["train", str(CONFIGS / "quickstart.yaml"), "meta.trian_shots=3", f"out_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "meta.trian_shots" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # failed before any work: no run folder


def test_impossible_episodes_fail_before_training(capsys, tmp_path):
    code = main(["train", str(CONFIGS / "quickstart.yaml"), "meta.ways=200", f"out_dir={tmp_path}"])
    assert code == 2
    assert "meta.ways=200" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    code = main(["train", str(CONFIGS / "quickstart.yaml"), "meta.train_shots=15", f"out_dir={tmp_path}"])
    assert code == 2
    assert "shots + queries" in capsys.readouterr().err
