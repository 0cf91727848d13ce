"""Every bad input is a clear error before any work: config files and overrides (train, eval and
id alike), devices, output paths, foreign checkpoints and frozen episode manifests. Each message
names the thing that is wrong and what would be accepted; the CLI prints it without a traceback."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from metarobust.cli import main
from metarobust.config import to_dict
from metarobust.data.manifest import (
    check_manifest,
    freeze_episodes,
    load_manifest,
    manifest_batches,
    save_manifest,
)
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, ConfigWarning, DataError
from metarobust.experiment import load_config, model_from_checkpoint, resolve_manifest
from metarobust.models import MIN_IMAGE_SIZES, MODELS, build_model
from metarobust.training.recipes import build_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


def write_checkpoint(folder: Path, *overrides: str) -> Path:
    """A run folder holding a checkpoint as ``metarobust train`` writes it, of a small untrained
    model (no training: these tests never get past the checks)."""
    cfg = load_config(QUICKSTART, ["model.hidden=8", *overrides])
    size = cfg.data.image_size or 28
    model = build_model(cfg.model, 1, 5, size, cfg.data.dataset).train()
    state = {"step": 0, "config": to_dict(cfg), "model": model.state_dict(),
             "data": {"num_classes": 5, "in_channels": 1, "image_size": size}}
    path = folder / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "run")


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# -- overrides: train, eval and id give the same message ------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("attack.epz=0.1", "unknown config key 'attack.epz'; did you mean 'attack.eps'"),
    ("attack.steps=ten", "attack.steps='ten' is invalid; expected an integer, e.g. attack.steps=10"),
    ("meta.first_order=maybe", "meta.first_order='maybe' is invalid; expected a boolean"),
    ("meta=5", "'meta' is a config section, not a value"),
    ("attack.steps", "must look like key=value"),
])
@pytest.mark.parametrize("command", ["train", "eval", "id"])
def test_overrides_fail_alike_in_train_eval_and_id(command, override, message, run, tmp_path, capsys):
    target = str(QUICKSTART) if command == "train" else str(run)
    before = sorted(p.name for p in run.iterdir())
    code, err = cli(capsys, command, target, override, f"out_dir={tmp_path / 'out'}", "--quiet")
    assert code == 2 and message in err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("meta.ways=null", "meta.ways=null is invalid; expected an integer"),
    ("optim.lr=fast", "optim.lr='fast' is invalid; expected a number, or null"),
    ("analysis.estimators=twonn", "expected a list of strings in brackets"),
    ("eval.eps_sweep=[0,a]", "eval.eps_sweep[1]='a' is invalid; expected a list of numbers"),
    ("eval.union=5", "eval.union=5 is invalid; expected a mapping"),
    ("robust=trades", "'robust' is a config section, not a value"),  # a recipe's own section
    ("meta=null", "'meta' is a config section"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert message in str(info.value)


# -- config files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "holds a list"), ("5\n", "holds a number"),
                                        ("just words\n", "holds a string"),
                                        ("meta: 5\n", "'meta' is a config section")])
def test_a_config_file_must_be_a_mapping_of_sections(tmp_path, text, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as info:
        load_config(path)
    assert kind in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_warns_that_every_default_applies(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.warns(ConfigWarning, match="EVERY DEFAULT APPLIES.*15,000 meta-updates"):
        cfg = load_config(path)
    assert cfg.train.iterations == 15000 and cfg.recipe == "r_maml"


def test_a_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


# -- the device -----------------------------------------------------------------------------------

def test_cuda_without_a_gpu_names_device_and_the_fix(monkeypatch, run, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' is invalid.*device=cpu, or device=auto"):
        load_config(QUICKSTART, ["device=cuda"])
    code, err = cli(capsys, "eval", str(run), "device=cuda:0", "--quiet")  # a run trained elsewhere
    assert code == 2 and "device='cuda:0'" in err and "device=cpu" in err


def test_a_gpu_index_past_the_machines_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device='cuda:2' is invalid; expected cuda:0 .. cuda:1"):
        load_config(QUICKSTART, ["device=cuda:2"])
    with pytest.raises(ConfigError, match="device='cuda:x' is invalid"):
        load_config(QUICKSTART, ["device=cuda:x"])


# -- output paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "quickstart"])
@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_folder_that_is_a_file_fails_before_work(tmp_path, capsys, command, below):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / below if below else afile
    argv = (["train", str(QUICKSTART), f"out_dir={out}"] if command == "train"
            else ["quickstart", "--out-dir", str(out), "--quiet"])
    code, err = cli(capsys, *argv)
    key = "out_dir" if command == "train" else "--out-dir"
    assert code == 2 and f"{key}='{out}' is invalid" in err
    assert ("is a file" if below else "not an existing file") in err
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("command, output, written", [("id", "id.png", "id.json"),
                                                      ("id", "id.json", "id.png"),
                                                      ("eval", "eval/default_robustness_vs_eps.png", "eval/default.json"),
                                                      ("eval", "eval/default.json", "report.md"),
                                                      ("eval", "report.md", "eval/default.json")])
def test_a_plot_or_report_path_that_is_a_folder_fails_before_work(run, capsys, command, output, written):
    (run / output).mkdir(parents=True)
    code, err = cli(capsys, command, str(run), "--quiet")
    assert code == 2 and f"{output}' is invalid; expected a file path to write, not a folder" in err
    assert not (run / written).exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder_fails_before_work(tmp_path, capsys, run):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "train", str(QUICKSTART), f"out_dir={locked / 'runs'}")
        assert code == 2 and "is not writable" in err
        run.chmod(0o500)
        code, err = cli(capsys, "id", str(run), "--quiet")
        assert code == 2 and "is not writable" in err
    finally:
        locked.chmod(0o700)
        run.chmod(0o700)


# -- checkpoints ----------------------------------------------------------------------------------

class NotATensor:
    pass


def _truncated(path: Path, run: Path) -> None:
    whole = (run / "checkpoints" / "last.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


FOREIGN = {
    "bare state_dict": (lambda p, run: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
                        "a bare state_dict (2 tensors, e.g. 'weight')"),
    "tensor": (lambda p, run: torch.save(torch.zeros(3, 4), p), "a tensor of shape [3, 4]"),
    "other dict": (lambda p, run: torch.save({"epoch": 3, "net": {}}, p), "without ['config', 'model', 'step']"),
    "pickle": (lambda p, run: p.write_bytes(pickle.dumps(NotATensor())), "Python objects other than tensors"),
    "truncated": (_truncated, "truncated, or not a torch file"),
    "empty": (lambda p, run: p.write_bytes(b""), "truncated, or not a torch file"),
    "text": (lambda p, run: p.write_text("hello"), "truncated, or not a torch file"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_foreign_pt_file_is_not_a_metarobust_checkpoint(kind, run, tmp_path, capsys):
    make, detail = FOREIGN[kind]
    path = tmp_path / "foreign.pt"
    make(path, run)
    with pytest.raises(ConfigError) as info:
        model_from_checkpoint(path)
    message = str(info.value)
    assert f"{path} is not a metarobust checkpoint" in message and detail in message
    assert "expected a run folder (runs/<name>) or its checkpoints/last.pt" in message
    for command in ("eval", "id"):
        code, err = cli(capsys, command, str(path), "--quiet")
        assert code == 2 and "is not a metarobust checkpoint" in err


def test_an_override_that_changes_the_architecture_names_the_model_fields(run):
    with pytest.raises(ConfigError, match="weights do not fit the model.*model.hidden=16"):
        model_from_checkpoint(run, ["model.hidden=16"])


@pytest.mark.parametrize("recipe", ["maml", "pgd_at"])
@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_model_from_checkpoint_returns_every_model_in_eval_mode(tmp_path, name, recipe):
    size = max(32, MIN_IMAGE_SIZES[name])
    folder = write_checkpoint(tmp_path / name, f"model.name={name}", f"recipe={recipe}", f"data.image_size={size}")
    _, model, _ = model_from_checkpoint(folder)
    assert not model.training and not any(m.training for m in model.modules())


# -- frozen episode manifests ---------------------------------------------------------------------

def make_store(classes: int = 12, per_class: int = 8) -> ImageStore:
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    return ImageStore(images, labels, [f"class{c:02d}" for c in range(classes)], "synthetic")


@pytest.fixture
def frozen() -> dict:
    """A valid 5-way 1-shot 3-query manifest of 4 episodes, as its JSON document."""
    manifest = freeze_episodes(make_store(), 5, 1, 3, count=4, seed=0, dataset="synthetic")
    return {k: v for k, v in manifest.__dict__.items() if k != "source"}


def _set(path: tuple, value):
    def change(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value(doc) if callable(value) else value
    return change


BAD_MANIFESTS = {
    "negative id": (_set(("episodes", 2, "support", 0, 0), -1), 2, "support", "image position -1 is invalid"),
    "fractional id": (_set(("episodes", 2, "query", 1, 0), 1.5), 2, "query", "image position 1.5 is invalid"),
    "id as a string": (_set(("episodes", 2, "query", 1, 0), "3"), 2, "query", "image position '3' is invalid"),
    "missing query": (_set(("episodes", 2, "query"), KeyError), 2, "query", "is missing"),
    "missing classes": (_set(("episodes", 1, "classes"), KeyError), 1, "classes", "is missing"),
    "header ways": (_set(("ways",), 4), 0, "classes", "the header declares ways=4"),
    "header shots": (_set(("shots",), 2), 0, "support", "shots=2"),
    "header queries": (_set(("queries",), 5), 0, "query", "queries=5"),
    "short query row": (_set(("episodes", 3, "query", 4), [0]), 3, "query", "queries=3"),
    "support reused as query": (_set(("episodes", 2, "query", 0, 0), lambda d: d["episodes"][2]["support"][0][0]),
                                2, "query", "is also a support image of the episode"),
    "query image twice": (_set(("episodes", 1, "query", 2, 1), lambda d: d["episodes"][1]["query"][2][0]),
                          1, "query", "appears twice"),
    "class twice": (_set(("episodes", 2, "classes", 1), lambda d: d["episodes"][2]["classes"][0]),
                    2, "classes", "appears twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_episode_names_the_manifest_the_episode_and_the_field(frozen, tmp_path, case):
    change, episode, field, message = BAD_MANIFESTS[case]
    doc = copy.deepcopy(frozen)
    change(doc)
    path = tmp_path / "episodes.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        load_manifest(path)
    text = str(info.value)
    assert f"episode manifest '{path}': episode {episode}, field '{field}'" in text and message in text, text


@pytest.mark.parametrize("change, message", [
    (_set(("ways",), KeyError), "field 'ways' is missing"),
    (_set(("ways",), "5"), "field 'ways' is '5'; expected an integer >= 1"),
    (_set(("episodes",), []), "field 'episodes' is empty"),
    (_set(("count",), 7), "field 'count' declares 7 episodes but 'episodes' holds 4"),
    (_set(("extra",), 1), "unknown fields ['extra']"),
])
def test_a_bad_manifest_header_names_the_field(frozen, tmp_path, change, message):
    doc = copy.deepcopy(frozen)
    change(doc)
    path = tmp_path / "episodes.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="episodes.json") as info:
        load_manifest(path)
    assert message in str(info.value)
    with pytest.raises(DataError, match="not an object"):
        check_manifest([doc], "list.json")


@pytest.mark.parametrize("name, message", [("test_5way_1shot_3query_4.json", None),
                                           ("test_5way_1shot_3query_600.json", "declares count 600"),
                                           ("test_5way_5shot_3query_4.json", "declares shots 5")])
def test_the_file_name_declares_the_episode_shape(frozen, tmp_path, name, message):
    path = tmp_path / name
    path.write_text(json.dumps(frozen))
    if message is None:
        assert len(load_manifest(path)) == 4
        return
    with pytest.raises(DataError, match=message):
        load_manifest(path)


def test_image_positions_past_the_class_name_the_episode(frozen, tmp_path):
    doc = copy.deepcopy(frozen)
    doc["episodes"][3]["support"][1][0] = 99  # the classes hold 8 images each
    path = save_manifest(load_manifest_doc(doc, tmp_path), tmp_path / "m.json")
    with pytest.raises(DataError, match=r"'.*m.json': episode 3, field 'support': image positions exceed"):
        list(manifest_batches(make_store(), load_manifest(path), batch_size=2))


def load_manifest_doc(doc: dict, tmp_path: Path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    return load_manifest(path)


def test_saved_manifests_do_not_record_where_they_were_read(frozen, tmp_path):
    manifest = load_manifest_doc(frozen, tmp_path)
    saved = json.loads(save_manifest(manifest, tmp_path / "again.json").read_text())
    assert saved == frozen


@pytest.mark.parametrize("recipe, fits", [("maml", False), ("rfs", True)])
def test_more_ways_than_the_head_scores_is_refused_when_a_manifest_meets_a_model(tmp_path, recipe, fits):
    store = make_store()
    path = save_manifest(freeze_episodes(store, 6, 1, 3, count=2, seed=0, dataset="synthetic"), tmp_path / "m.json")
    cfg = load_config(QUICKSTART, ["model.hidden=8", f"recipe={recipe}", f"eval.manifest={path}"])
    model = build_model(cfg.model, 1, 5, 16, cfg.data.dataset).eval()  # a 5-way head
    recipe_obj = build_recipe(cfg)
    with pytest.warns(UserWarning, match="6-way"):  # the config's meta.ways=5 is ignored, as before
        if fits:  # RFS fits a logistic probe per episode: any number of ways
            assert resolve_manifest(cfg, store, model=model, recipe=recipe_obj).ways == 6
            return
        with pytest.raises(DataError, match=r"m.json'.*6-way \(field 'ways'.*model's head \(model.head\) scores 5"):
            resolve_manifest(cfg, store, model=model, recipe=recipe_obj)
