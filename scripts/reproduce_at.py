"""A small but honest comparison of standard adversarial training on CIFAR-10, in one command.

Natural training, PGD-AT, TRADES, MAT and LTD train with the same budget (model, images, epochs,
optimiser, schedule) from their own configs under ``configs/at/`` and are scored by the
robust-evaluation harness on the same test images: clean accuracy, PGD-20 (with the
gradient-masking checks) and AutoAttack's APGD-CE + APGD-T subset (``eval.suite=apgd_ce_t``:
APGD-CE, then targeted APGD-DLR on the survivors, 100 steps each; not the standard AutoAttack,
which adds FAB-T and Square: run ``metarobust eval <run> eval.suite=autoattack`` for that). LTD's teacher is this study's own TRADES model.

Two scales:

- ``--scale cpu`` (default): the staged lossy JPEG copy of CIFAR-10 (``../shared/data/cifar10-jpg``),
  PreAct-ResNet-18 at an eighth of its width (``--width 8``: 8-64 filters), 2,000 training images,
  5 epochs, lr 0.1 with a x0.1 decay at 3/4 of training, PGD-20 on 500 test images (a fixed
  seeded subset) and the cascade on the first 200 of them. About half an hour on a 2-core CPU.
  Absolute numbers are far from the papers (a tiny budget); the *ordering* and the gaps are what
  it can show.
- ``--scale gpu``: the real python pickles (``data.root``), the papers' models and schedules
  (each config's own values: PreAct-ResNet-18 / WRN-34-10, 76-200 epochs), the whole test set.

Writes ``<out>/results.json``, ``<out>/results.md`` (a table) and ``<out>/clean_vs_robust.png``,
and ends with one JSON line of the headline figures.

    python scripts/reproduce_at.py                                   # CPU scale
    python scripts/reproduce_at.py --methods natural,pgd_at --epochs 2
    python scripts/reproduce_at.py --scale gpu --data-root ~/data/cifar-10-batches-py

Published reference points (``shared/methods/ADVERSARIAL_TRAINING.md``): MAT is claimed to beat
PGD-AT by about 8 points under PGD-100; LTD reaches 58.19 % robust accuracy (WRN-34-10, with AWP,
which this toolkit does not implement).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metarobust.data.datasets import load_split  # noqa: E402
from metarobust.evaluation import evaluate_run  # noqa: E402
from metarobust.experiment import (  # noqa: E402
    load_config,
    model_from_state,
    train_and_evaluate,
)
from metarobust.plots import plot_clean_vs_robust  # noqa: E402
from metarobust.resources import configs_dir  # noqa: E402
from metarobust.runs import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGED = ROOT.parent / "shared" / "data" / "cifar10-jpg" / "cifar10_jpg.tar.gz"
METHODS = ("natural", "pgd_at", "trades", "mat", "ltd")


def scale_overrides(args: argparse.Namespace) -> list[str]:
    """The shared budget: every method gets exactly these overrides."""
    if args.scale == "gpu":
        out = ["eval.points=0"]
    else:
        epochs = args.epochs
        out = [
            "model.name=preact_resnet18", f"model.hidden={args.width}", f"at.train_size={args.train_size}",
            f"at.epochs={epochs}", "optim.schedule=piecewise", f"optim.milestones=[{0.75 * epochs}]", "optim.lr=0.1",
            "at.batch_size=128", f"eval.points={args.points}", "eval.check_points=100",
            "mat.peers=2",
        ]
    if args.data_root:
        out.append(f"data.root={args.data_root}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--epochs", type=int, default=5, help="CPU scale: training epochs")
    parser.add_argument("--width", type=int, default=8, help="CPU scale: model.hidden (64: the paper's width)")
    parser.add_argument("--train-size", type=int, default=2000, help="CPU scale: training images")
    parser.add_argument("--points", type=int, default=500, help="CPU scale: test images for PGD-20")
    parser.add_argument("--aa-points", type=int, default=200, help="test images for APGD-CE + APGD-T")
    parser.add_argument("--data-root", default=str(STAGED) if STAGED.exists() else None)
    parser.add_argument("--out", default="runs/reproduce_at")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides applied to every method")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if "ltd" in methods and "trades" not in methods:
        parser.error("--methods: ltd distils from this study's TRADES model; include trades")
    if args.data_root is None:
        parser.error("--data-root: no CIFAR-10 found (the staged ../shared/data/cifar10-jpg is absent); "
                     "give the cifar-10-batches-py folder or the official .tar.gz")
    methods.sort(key=METHODS.index)  # trades before ltd
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = scale_overrides(args) + [f"device={args.device}", f"out_dir={out}"] + args.overrides

    # Every config is loaded and checked before any training starts.
    configs = {}
    for method in methods:
        extra = [f"name={method}"]
        if method == "ltd":
            extra.append(f"ltd.teacher={out / 'trades'}")
        path = configs_dir() / "at" / f"cifar10_{method}.yaml"
        configs[method] = (path, common + extra)
        # LTD's teacher does not exist yet: check the rest now, the teacher when LTD starts.
        load_config(path, common + (extra if method != "ltd" else [f"name={method}"]))

    results: dict[str, dict] = {}
    for method in methods:
        path, overrides = configs[method]
        cfg = load_config(path, overrides)
        print(f"== {method}: {path.name} {' '.join(overrides)}", flush=True)
        start = time.perf_counter()
        summary = train_and_evaluate(cfg, progress=True)
        seconds = time.perf_counter() - start
        # AutoAttack's APGD-CE + APGD-T subset on the first --aa-points test images.
        aa_cfg = load_config(path, overrides + ["eval.suite=apgd_ce_t", f"eval.points={args.aa_points}",
                                                "eval.checks=false"])
        state = load_checkpoint(Path(summary["run"]) / "checkpoints" / "last.pt")
        model = model_from_state(aa_cfg, state)
        test = load_split(aa_cfg.data, "test").to(next(model.parameters()).device)
        aa = evaluate_run(aa_cfg, model, test).as_dict()
        failed = [c["name"] for c in summary.get("checks", []) if not c["passed"]]
        results[method] = {
            "clean_acc": summary["clean_acc"], "pgd20_acc": summary["robust_acc"],
            "aa_acc": aa["robust_acc"], "aa_after": aa["after"], "aa_points": aa["points"],
            "pgd_points": summary["points"], "checks_failed": failed, "seconds": round(seconds, 1),
            "stopped": summary.get("stopped"), "run": summary["run"],
        }
        print(json.dumps({method: results[method]}), flush=True)

    write_outputs(out, results, args)


def write_outputs(out: Path, results: dict[str, dict], args: argparse.Namespace) -> None:
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    payload = {"scale": args.scale, "epochs": args.epochs if args.scale == "cpu" else "config",
               "machine": machine, "device": device, "torch": torch.__version__, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    lines = [f"# Standard AT on CIFAR-10 ({args.scale} scale, {device})", "",
             "| method | clean % | PGD-20 % | APGD-CE + APGD-T % | masking checks | train+eval s |",
             "|---|---:|---:|---:|---|---:|"]
    for method, r in results.items():
        checks = "ok" if not r["checks_failed"] else "FAILED: " + ", ".join(r["checks_failed"])
        lines.append(f"| {method} | {100 * r['clean_acc']:.2f} | {100 * r['pgd20_acc']:.2f} | "
                     f"{100 * r['aa_acc']:.2f} | {checks} | {r['seconds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    def ci95(p: float, n: int) -> float:  # binomial interval of an accuracy over n test images
        return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))

    bars = {m: {"clean_acc": r["clean_acc"], "clean_ci95": ci95(r["clean_acc"], r["pgd_points"]),
                "robust_acc": r["aa_acc"], "robust_ci95": ci95(r["aa_acc"], r["aa_points"])}
            for m, r in results.items()}
    plot_clean_vs_robust(bars, out / "clean_vs_robust.png", f"CIFAR-10 ({args.scale} scale)",
                         chance=0.1, robust_label="robust (APGD-CE + APGD-T)", ylabel="test accuracy (%)")
    headline = {f"{m}_{k}": round(100 * r[k], 2) for m, r in results.items() for k in ("clean_acc", "pgd20_acc", "aa_acc")}
    if "mat" in results and "pgd_at" in results:
        headline["mat_minus_pgd_at_pgd20"] = round(100 * (results["mat"]["pgd20_acc"] - results["pgd_at"]["pgd20_acc"]), 2)
    print(json.dumps({"scale": args.scale, "device": device, **headline}))


if __name__ == "__main__":
    main()
