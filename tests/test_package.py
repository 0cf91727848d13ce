"""metarobust as an installed package: shipped configs and episodes found by name from any
working directory, the command line's contract (version, help, exit statuses, a closed pipe), the
``episodes freeze`` safeguards, and a wheel built offline that runs outside the checkout."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metarobust
from metarobust import resources
from metarobust.cli import build_parser, main
from metarobust.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m metarobust ARGS`` in a fresh interpreter, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "metarobust", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def checkout_env() -> dict[str, str]:
    """Imports this checkout's metarobust whatever the working directory."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# Shipped configs and episodes


def test_a_shipped_config_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = resources.configs_dir() / "meta" / "omniglot_maml.yaml"
    assert shipped.is_file()
    for name in ("meta/omniglot_maml.yaml", "meta/omniglot_maml", "configs/meta/omniglot_maml.yaml"):
        assert resources.config_path(name) == shipped


def test_a_file_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("meta:\n  ways: 3\n")
    assert resources.config_path("quickstart.yaml") == Path("quickstart.yaml")


def test_an_unknown_config_name_suggests_the_closest_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist.*did you mean meta/omniglot_maml\.yaml"):
        resources.config_path("meta/omniglot_mamll.yaml")


def test_load_config_takes_a_shipped_name(tmp_path, monkeypatch):
    from metarobust.experiment import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("meta/glyphs_maml.yaml", ["meta.ways=3"])
    assert cfg.data.dataset == "glyphs" and cfg.meta.ways == 3


def test_every_shipped_config_is_listed_and_every_listed_name_resolves():
    names = resources.shipped_configs()
    assert "quickstart.yaml" in names and "meta/omniglot_rmaml.yaml" in names
    assert all(resources.config_path(n).is_file() for n in names)
    assert len(names) == len(list(resources.configs_dir().rglob("*.yaml")))


def test_splits_and_benchmark_manifests_are_read_from_the_package():
    from metarobust.data import catalog
    from metarobust.data.manifest import default_manifest_path

    package = Path(metarobust.__file__).parent
    assert catalog.SPLITS_DIR == package / "episodes"
    assert catalog.split_file_path("glyphs").is_file()
    path = default_manifest_path("glyphs", 5, 1, 10, 100)
    assert path == package / "episodes" / "glyphs" / "test_5way_1shot_10query_100.json" and path.is_file()


def test_a_shape_that_does_not_ship_is_looked_up_in_the_user_folder(tmp_path, monkeypatch):
    from metarobust.data.manifest import default_manifest_path

    monkeypatch.setenv("METAROBUST_EPISODES", str(tmp_path))
    expected = tmp_path / "glyphs" / "test_3way_2shot_4query_7.json"
    assert default_manifest_path("glyphs", 3, 2, 4, 7) == expected


# The command line


def test_version_is_the_installed_distributions(capsys):
    assert metarobust.__version__ == importlib.metadata.version("metarobust")
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"metarobust {metarobust.__version__}"


def test_python_dash_m_runs_the_command_line(tmp_path):
    result = run_module("--version", cwd=tmp_path, env=checkout_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"metarobust {metarobust.__version__}"


def parsers(parser: argparse.ArgumentParser, path: str = "metarobust"):
    """``(command path, parser)`` for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def test_every_flag_and_subcommand_has_help_without_restructuredtext_markup():
    markup = re.compile(r"``|:[a-z]+:`")
    for path, parser in parsers(build_parser()):
        texts = [parser.description or "", parser.format_help()]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
                missing = sorted(set(action.choices) - {n for n, h in helps.items() if h})
                assert not missing, f"{path}: subcommands without help: {missing}"
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{path}: {action.option_strings or action.dest} has no help"
        for text in texts:
            assert not markup.search(text), f"{path} --help shows reST markup: {markup.search(text)[0]}"


def test_list_configs_names_what_train_accepts(capsys):
    assert main(["list", "configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == resources.shipped_configs()
    assert any(line.startswith("quickstart.yaml") and "glyphs" in line for line in lines)


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``metarobust list configs | head -0``: the reader is gone before the first write."""
    env = {**os.environ, **checkout_env()}
    proc = subprocess.Popen([sys.executable, "-m", "metarobust", "list", "configs"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert stderr == ""  # no traceback, no "Exception ignored"


def test_data_info_exits_non_zero_when_a_split_fails(monkeypatch, capsys):
    from metarobust.data import catalog

    real = catalog.load_split

    def broken_val(cfg, split):
        if split == "val":
            raise DataError("glyphs: val images are corrupt")
        return real(cfg, split)

    monkeypatch.setattr(catalog, "load_split", broken_val)
    assert main(["data", "info", "glyphs"]) == 2
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["failed"] == ["val"] and info["splits"]["test"]["classes"] > 0
    assert "split 'val' failed to load" in err and "corrupt" in err


def test_data_info_exits_zero_when_every_split_loads(capsys):
    assert main(["data", "info", "glyphs"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == []


# episodes freeze


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a command loads a split: its checks come before any work."""
    import metarobust.data.datasets as datasets

    def load_split(cfg, split):
        raise AssertionError("the split was loaded before the arguments were checked")

    monkeypatch.setattr(datasets, "load_split", load_split)


@pytest.mark.parametrize("flag, value", [("--ways", "0"), ("--count", "0"), ("--shots", "-1"),
                                         ("--queries", "-3"), ("--seed", "-1"), ("--ways", "five")])
def test_freeze_refuses_numbers_that_cannot_make_episodes(flag, value, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["episodes", "freeze", "glyphs", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and value in err


def test_freeze_refuses_an_out_that_is_a_directory(tmp_path, no_loading, capsys):
    assert main(["episodes", "freeze", "glyphs", "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_freeze_never_writes_over_a_shipped_benchmark_manifest(tmp_path, monkeypatch, no_loading, capsys):
    monkeypatch.setenv("METAROBUST_EPISODES", str(tmp_path))
    shipped = resources.shipped_manifest("glyphs", "test_5way_1shot_10query_100.json")
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    for force in ([], ["--force"]):
        code = main(["episodes", "freeze", "glyphs", "--queries", "10", "--count", "100", *force])
        assert code == 2
        err = capsys.readouterr().err
        assert str(shipped) in err and "--out PATH" in err and "eval.manifest=PATH" in err
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    assert list(tmp_path.iterdir()) == []


def test_freeze_writes_to_the_user_folder_and_replaces_a_file_only_with_force(tmp_path, monkeypatch, capsys):
    from metarobust.data.manifest import default_manifest_path, load_manifest

    monkeypatch.setenv("METAROBUST_EPISODES", str(tmp_path))
    args = ["episodes", "freeze", "glyphs", "--ways", "3", "--queries", "2", "--count", "4"]
    assert main(args) == 0
    path = tmp_path / "glyphs" / "test_3way_1shot_2query_4.json"
    assert f"wrote 4 episodes to {path}" in capsys.readouterr().out
    assert default_manifest_path("glyphs", 3, 1, 2, 4) == path  # training and eval find it
    first = path.read_bytes()

    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and path.read_bytes() == first
    assert main([*args, "--seed", "1", "--force"]) == 0
    assert load_manifest(path).seed == 1


def test_freeze_refuses_an_existing_out_file_without_force(tmp_path, no_loading, capsys):
    out = tmp_path / "mine.json"
    out.write_text("{}")
    assert main(["episodes", "freeze", "glyphs", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"


# The wheel


def setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


@pytest.mark.wheel
@pytest.mark.skipif(setuptools_version() < (77,), reason="building the wheel offline needs setuptools>=77 "
                                                          "in this environment (pyproject build-system)")
def test_the_built_wheel_runs_outside_the_checkout(tmp_path):
    """Build the wheel without the network (no build isolation, no dependencies), install it into
    a folder, and run it from a directory that is not the checkout: the configs and episodes must
    come from the installed package. About 10-20 s, most of it importing torch."""
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "metarobust", source / "metarobust",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=240)
    [wheel] = (tmp_path / "dist").glob("metarobust-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, timeout=240)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "METAROBUST_EPISODES": str(tmp_path / "user")}
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]

    # The interpreter below resolves imports as python -m does (the same sys.path): the installed
    # copy, not the checkout nor the environment's editable install.
    check = f"""
from pathlib import Path
import metarobust
from metarobust.data.manifest import default_manifest_path, load_manifest
from metarobust.experiment import load_config
package = Path(metarobust.__file__).parent
assert package == Path({str(site / "metarobust")!r}), package
assert (package / "py.typed").is_file()
cfg = load_config("quickstart.yaml", ["train.iterations=1"])
manifest = load_manifest(default_manifest_path("glyphs", 5, 1, 10, 100))
assert manifest.dataset == "glyphs" and len(manifest) == 100
print("ok", cfg.data.dataset)
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=outside, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok glyphs", result.stderr

    script = site / "bin" / "metarobust"  # the console script pip wrote: the entry point works
    result = subprocess.run([str(script), "--version"], cwd=outside, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"metarobust {version}", result.stderr
    result = run_module("list", "configs", cwd=outside, env=env)
    assert result.returncode == 0 and "meta/omniglot_maml.yaml" in result.stdout, result.stderr
    result = run_module("data", "info", "glyphs", cwd=outside, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["splits"]["test"]["classes"] == 33  # the shipped splits.json
    licenses = list(site.glob("metarobust-*.dist-info/licenses/LICENSE"))
    assert licenses and "MIT License" in licenses[0].read_text()


# What the documentation names


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "metarobust").rglob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]


def test_every_config_and_episodes_file_the_documentation_names_ships():
    """``configs/at/x.yaml`` in a README command must be a shipped config (it resolves by name from
    any install), and ``episodes/<dataset>/<file>`` a shipped file."""
    missing = []
    for doc in DOCUMENTS:
        text = doc.read_text(encoding="utf-8")
        for name in sorted(set(re.findall(r"\bconfigs/([\w/]+\.yaml)", text))):
            if not (resources.configs_dir() / name).is_file():
                missing.append(f"{doc.relative_to(REPO)}: configs/{name}")
        for name in sorted(set(re.findall(r"\bepisodes/(\w+/[\w.]+\.json)", text))):
            if not (resources.episodes_dir() / name).is_file():
                missing.append(f"{doc.relative_to(REPO)}: episodes/{name}")
    assert not missing, "documented but not shipped:\n" + "\n".join(missing)
