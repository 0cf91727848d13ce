"""Every shipped config trains and evaluates through the one engine: a smoke run of each.

Each YAML under ``configs/`` (the study files excepted) is loaded as a user would, shrunk to a few
steps (narrow model, a few hundred images, a few episodes or test points, short attacks) and run
through ``metarobust.experiment.train_and_evaluate``: training, checkpoint, evaluation, report.
Recipes that start from a checkpoint (``ltd``'s teacher, ``at.init`` of ``frl`` and
``adversarial_finetune``) get one from a natural run of the same shrunk settings first. Needs the
staged datasets (``--data``, default ``../shared/data``); configs whose data is absent are skipped.

    python scripts/smoke_configs.py [--data ../shared/data] [--only cifar10_mat]

Ends with one JSON line: ``{"passed": n, "failed": [...], "skipped": [...], "seconds": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metarobust.experiment import load_config, train_and_evaluate  # noqa: E402
from metarobust.resources import configs_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"omniglot": "omniglot", "mnist": "mnist", "fashion_mnist": "fashion-mnist", "cifar10": "cifar10-jpg"}
"""Dataset -> folder under the staged data (glyphs is embedded)."""
SMALL = ["model.hidden=8", "train.log_every=1", "train.checkpoint_every=1000", "eval.checks=false",
         "attack.steps=2", "train_attack.steps=1", "meta.meta_batch_size=2", "meta.queries=2",
         "meta.inner_steps=1", "meta.test_inner_steps=1", "eval.episodes=4", "eval.batch_size=4",
         "train.iterations=2", "at.epochs=1", "at.batch_size=32", "at.train_size=64", "eval.points=32",
         "optim.milestones=[1]", "data.image_size=32", "model.drop_rate=0"]


def smoke(path: Path, data: Path, out: Path, natural: dict[str, str]) -> dict:
    """Train and evaluate ``path`` shrunk; returns its summary."""
    base = load_config(path)
    extra = [f"out_dir={out}", f"name={path.stem}"]
    dataset = base.data.dataset
    if dataset in ROOTS:
        extra.append(f"data.root={data / ROOTS[dataset]}")
    size = {"omniglot": 28, "glyphs": 28, "mnist": 28, "fashion_mnist": 28}.get(dataset, 32)
    small = [s if not s.startswith("data.image_size") else f"data.image_size={size}" for s in SMALL]
    if base.recipe == "free_at":
        small.append("at.replays=2")
    if base.recipe in ("ltd", "frl", "adversarial_finetune"):
        checkpoint = natural.setdefault(dataset, str(_natural(base, small + extra, out)))
        extra += [f"ltd.teacher={checkpoint}"] if base.recipe == "ltd" else [f"at.init={checkpoint}"]
        if base.recipe == "frl":
            extra.append("at.holdout=32")
    cfg = load_config(path, [*small, *extra])
    return train_and_evaluate(cfg, progress=False)


def _natural(base, overrides: list[str], out: Path) -> Path:
    """A natural run of the same model and data, to start from or distil from."""
    cfg = load_config(None, [f"data.dataset={base.data.dataset}", f"model.name={base.model.name}", "recipe=natural",
                             *[o for o in overrides if not o.startswith("name=")], f"name=natural_{base.data.dataset}"])
    train_and_evaluate(cfg, progress=False)
    return out / cfg.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the staged datasets")
    parser.add_argument("--only", default=None, help="run only configs whose name contains this")
    args = parser.parse_args()
    data, start = Path(args.data), time.perf_counter()
    paths = [p for p in sorted(configs_dir().rglob("*.yaml"))
             if not p.stem.startswith("shots_study") and p.parent.name != "seg"]  # seg: metarobust seg train
    if args.only:
        paths = [p for p in paths if args.only in p.stem]
    passed, failed, skipped, natural = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            dataset = load_config(path).data.dataset
            if dataset in ROOTS and not (data / ROOTS[dataset]).exists():
                skipped.append(path.stem)
                continue
            t0 = time.perf_counter()
            try:
                summary = smoke(path, data, Path(tmp), natural)
                passed.append(path.stem)
                print(f"ok    {path.relative_to(configs_dir())}  clean {summary['clean_acc']:.3f} robust "
                      f"{summary['robust_acc']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            except Exception:  # report every config, then fail at the end
                failed.append(path.stem)
                print(f"FAIL  {path.relative_to(configs_dir())}\n{traceback.format_exc()}", flush=True)
    print(json.dumps({"passed": len(passed), "failed": failed, "skipped": skipped,
                      "seconds": round(time.perf_counter() - start, 1)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
