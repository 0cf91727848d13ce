"""Standard adversarial training compared with intervals: natural, PGD-AT, TRADES, MAT and LTD
trained with one budget and scored on the same test points, with paired tests between them.

Every method trains from its own config (``configs/at/<dataset>_<method>.yaml``) with the shared
budget of the chosen scale, selects its deployed epoch on held-out training images (``at.select``;
Rice et al.'s early stopping against robust overfitting) and is scored on the *same*
``--points`` test images (a fixed seeded subset) with the same attacks: clean accuracy, PGD-20
(with the gradient-masking checks) and AutoAttack's APGD-CE + APGD-T cascade
(``eval.suite=apgd_ce_t``: APGD-CE, then targeted APGD-DLR over 9 targets on the survivors, 100
steps each; not the standard AutoAttack, which adds FAB-T and Square). LTD's teacher is this
study's own TRADES model (its selected epoch).

Since the points are shared, the contrasts the comparison is about (PGD-AT vs natural, TRADES vs
PGD-AT, MAT vs PGD-AT, LTD vs TRADES) are paired: McNemar's exact test on the points where the two
models' verdicts differ, and the exact interval of the difference given them
(``metarobust.evaluation.paired``). A contrast is "separated" when p < 0.05 (its interval then
excludes 0). Per method: accuracies with 95 % binomial half-widths over the points.

Scales:

- ``--scale cpu`` (default): ``--dataset cifar10`` reads the staged lossy JPEG copy
  (``../shared/data/cifar10-jpg``), PreAct-ResNet-18 at width ``--width`` (8: 8-64 filters),
  ``--train-size`` training images for ``--epochs`` epochs, SGD lr 0.1 x0.1 at 3/4 of training,
  every method trained (``train_attack``) and evaluated at eps 8/255. ``--dataset mnist`` reads
  ``../shared/data/mnist``: TRADES' small CNN at ``--width`` (32: half its width), eps 0.3,
  training attack PGD-10 step 0.04, PGD-20 at evaluation with step 0.0375 (2.5 eps / 20).
  The defaults are sized for about an hour on one core of a 2-core CPU
  (``docs/adversarial_training.md``: the measured costs and the estimate).
- ``--scale gpu``: each config's own settings (the papers' models, schedules and attacks; data
  from ``--data-root``: the CIFAR-10 python pickles), the whole test set unless ``--points``.

Selection: ``--select best`` (default) holds out ``--holdout`` training images and deploys each
method's best epoch under PGD-10 on them; ``--select last`` deploys the last epoch. AWP (Wu et
al. 2020): ``--awp`` adds TRADES-AWP's weight perturbation (gamma 0.005) to TRADES and LTD. It is
off by default: the published TRADES and PGD-AT numbers are without AWP, and AWP on only some of
the methods would confound TRADES vs PGD-AT; LTD's published numbers were trained with it, so
``--awp`` gives it to TRADES and LTD alike (LTD vs TRADES stays like for like). Warm-up: the
reference's 9 epochs at the GPU scale, none at the CPU scale (a few epochs in all).

It runs in the background and resumes: a method whose run folder holds its finished evaluation
(``<out>/<method>/study.json``) is reused, a run with a checkpoint and no results resumes from
``checkpoints/last.pt``, a trained run without its cascade is only evaluated (``--resume`` says
so explicitly; it is also the default). A run made with other settings is refused with the
difference; ``--fresh`` deletes the methods' run folders first. ``<out>/results.json`` is
rewritten after every method.

Writes ``<out>/results.json``, ``<out>/results.md`` (tables), ``<out>/clean_vs_robust.png`` and
the committed summary ``--results`` (default ``docs/results/reproduce_at_<dataset>.json``), and
ends with one JSON line of the headline figures.

    python scripts/reproduce_at.py                                        # CIFAR-10, CPU scale
    nohup python scripts/reproduce_at.py --out runs/study > study.log 2>&1 &   # in the background
    python scripts/reproduce_at.py --resume                               # after a kill: continue
    python scripts/reproduce_at.py --dataset mnist --methods natural,pgd_at,trades
    python scripts/reproduce_at.py --scale gpu --data-root ~/data/cifar-10-batches-py --awp

Published reference points (``shared/methods/ADVERSARIAL_TRAINING.md``): MAT is claimed to beat
PGD-AT by about 8 points under PGD-100; LTD reaches 56.94 % AutoAttack (WRN-34-10, with AWP);
TRADES-AWP 56.17 %, TRADES 53.08 %, PGD-AT (Rice et al., WRN-34-20) 53.42 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metarobust.config import EPS_8, STEP_2, experiment_schema, to_dict  # noqa: E402
from metarobust.errors import ConfigError, MetarobustError  # noqa: E402
from metarobust.evaluation import paired_comparison, point_verdicts  # noqa: E402
from metarobust.experiment import evaluate_checkpoint, load_config, train_and_evaluate  # noqa: E402
from metarobust.plots import plot_clean_vs_robust  # noqa: E402
from metarobust.resources import configs_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("natural", "pgd_at", "trades", "mat", "ltd")
CONTRASTS = (("pgd_at", "natural"), ("trades", "pgd_at"), ("mat", "pgd_at"), ("ltd", "trades"))
"""The contrasts the comparison is about, each as (A, B): A minus B."""
AWP_METHODS = ("trades", "ltd")
AWP_GAMMA, AWP_WARMUP_GPU = 0.005, 9
"""TRADES-AWP's reference settings (``csdongxian/AWP`` ``trades_AWP/train_trades_cifar.py``:
gamma 0.005, AWP from its epoch 10 counted from 1)."""
CASCADE = "apgd_ce_t"
METRICS = (("clean", "clean accuracy"), ("pgd20", "PGD-20"), ("cascade", "APGD-CE + APGD-T"))
LOCATION_KEYS = ("name", "out_dir", "device", "data.root", "data.download")
"""Config keys that say where a run is, not what it is: ignored when a finished run is reused."""

DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "staged": SHARED / "cifar10-jpg" / "cifar10_jpg.tar.gz", "chance": 0.1, "train_images": 50000,
        "threat": [f"train_attack.eps={EPS_8}", f"attack.eps={EPS_8}", f"attack.step_size={STEP_2}"],
        "cpu": {"model": "preact_resnet18", "width": 8, "train_size": 2000, "epochs": 6, "holdout": 500},
    },
    "mnist": {
        "staged": SHARED / "mnist", "chance": 0.1, "train_images": 60000,
        "threat": ["train_attack.eps=0.3", "attack.eps=0.3", "attack.step_size=0.0375"],
        "cpu": {"model": "small_cnn", "width": 32, "train_size": 20000, "epochs": 6, "holdout": 500,
                "extra": ["train_attack.steps=10", "train_attack.step_size=0.04"]},
    },
}
"""Per dataset: the staged copy, chance, the threat model every method is trained and scored in
(PGD-20 at evaluation), and the CPU-scale defaults."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="cifar10")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--epochs", type=int, help="CPU scale: training epochs (cifar10 6, mnist 6)")
    parser.add_argument("--width", type=int, help="CPU scale: model.hidden (cifar10 8, mnist 32; 64: the paper's)")
    parser.add_argument("--train-size", type=int, help="CPU scale: training images (cifar10 2000, mnist 20000)")
    parser.add_argument("--holdout", type=int, help="held-out training images to select the epoch on "
                                                    "(CPU 500, GPU 1000)")
    parser.add_argument("--select", choices=("best", "last"), default="best",
                        help="deploy the best epoch on the holdout (default) or the last")
    parser.add_argument("--awp", action="store_true", help="TRADES-AWP's weight perturbation for trades and ltd")
    parser.add_argument("--points", type=int, help="test images every evaluation scores, the same for all "
                                                   "(CPU 1000; GPU 0: the whole test set)")
    parser.add_argument("--check-points", type=int, default=100, help="points of the gradient-masking checks")
    parser.add_argument("--threads", type=int, help="torch threads (CPU scale default 1: one core)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished methods and resume unfinished runs (also the default)")
    parser.add_argument("--fresh", action="store_true", help="delete the selected methods' run folders first")
    parser.add_argument("--data-root", help="the dataset's files (default: the staged copy in ../shared/data)")
    parser.add_argument("--out", help="the study's folder (default runs/reproduce_at_<dataset>)")
    parser.add_argument("--results", help="the committed summary (default docs/results/reproduce_at_<dataset>.json)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides applied to every method")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if "ltd" in methods and "trades" not in methods:
        parser.error("--methods: ltd distils from this study's TRADES model; include trades")
    if args.resume and args.fresh:
        parser.error("--resume and --fresh contradict each other: --fresh deletes what --resume would continue")
    args.methods = sorted(methods, key=METHODS.index)  # trades before ltd
    spec = DATASETS[args.dataset]
    cpu = spec["cpu"]
    gpu = args.scale == "gpu"
    args.epochs = args.epochs or cpu["epochs"]
    args.width = args.width or cpu["width"]
    args.train_size = args.train_size if args.train_size is not None else cpu["train_size"]
    args.holdout = args.holdout if args.holdout is not None else (1000 if gpu else cpu["holdout"])
    args.points = args.points if args.points is not None else (0 if gpu else 1000)
    args.threads = args.threads or (None if gpu else 1)
    if args.select == "best" and args.holdout < 1:
        parser.error("--select best needs held-out images: give --holdout N (e.g. 500), or --select last")
    staged = spec["staged"]
    args.data_root = args.data_root or (str(staged) if staged.exists() else None)
    if args.data_root is None:
        parser.error(f"--data-root: no {args.dataset} files found (the staged {staged} is absent); give the "
                     f"dataset's folder or archive")
    args.out = Path(args.out or f"runs/reproduce_at_{args.dataset}")
    args.results = Path(args.results or ROOT / "docs" / "results" / f"reproduce_at_{args.dataset}.json")
    return args


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """The budget and threat model every method gets."""
    spec = DATASETS[args.dataset]
    holdout = args.holdout if args.select == "best" else 0
    images = args.train_size if args.scale == "cpu" and args.train_size else spec["train_images"] - holdout
    per_epoch = max(1, images // 128)  # a checkpoint every epoch: a killed study loses at most one
    out = [*spec["threat"], "attack.steps=20", "attack.random_start=true", f"eval.points={args.points}",
           f"train.checkpoint_every={per_epoch}",
           f"eval.check_points={args.check_points}", f"at.select={args.select}",
           f"at.holdout={holdout}", f"data.root={args.data_root}",
           f"device={args.device}", f"out_dir={args.out}"]
    if args.scale == "cpu":
        cpu, epochs = spec["cpu"], args.epochs
        out += [f"model.name={cpu['model']}", f"model.hidden={args.width}", f"at.train_size={args.train_size}",
                f"at.epochs={epochs}", "optim.schedule=piecewise", f"optim.milestones=[{0.75 * epochs}]",
                "optim.lr=0.1" if args.dataset == "cifar10" else "optim.lr=0.01", "at.batch_size=128",
                "mat.peers=2", *cpu.get("extra", [])]
    return out + list(args.overrides)


def method_overrides(args: argparse.Namespace, method: str) -> list[str]:
    out = [f"name={method}"]
    if method == "ltd":
        out.append(f"ltd.teacher={args.out / 'trades'}")  # the run folder: its selected epoch (best.pt)
    if args.awp and method in AWP_METHODS:
        out += [f"awp.gamma={AWP_GAMMA}", f"awp.warmup={AWP_WARMUP_GPU if args.scale == 'gpu' else 0}"]
    return out


def config_path(args: argparse.Namespace, method: str) -> Path:
    return configs_dir() / "at" / f"{args.dataset}_{method}.yaml"


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("union",):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys (what a run is, not where) whose values differ between two resolved configs; a
    key the saved config predates takes its default (as ``--resume`` does)."""
    b = flat(now)
    a = {**{k: v for k, v in flat(to_dict(experiment_schema()())).items() if k in b}, **flat(saved)}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in LOCATION_KEYS and a.get(k) != b.get(k)}


def check_same_settings(run: Path, cfg) -> None:
    """Refuse to reuse or resume a run made with other settings (its ``config.yaml``)."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return
    changed = differences(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
    if changed:
        listed = "; ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in list(changed.items())[:8])
        raise ConfigError(f"{run} was made with other settings ({listed}); rerun with --fresh to train it again, "
                          f"or give another --out")


def run_method(args: argparse.Namespace, method: str, progress: bool) -> dict[str, Any]:
    """Train (or resume) one method, evaluate it (the end of training: clean + PGD-20 + checks;
    then the cascade on the same points), and return its record; reused when already done."""
    path, overrides = config_path(args, method), shared_overrides(args) + method_overrides(args, method)
    cfg = load_config(path, overrides)
    run = args.out / method
    check_same_settings(run, cfg)
    done = run / "study.json"
    if done.is_file():
        record = json.loads(done.read_text())
        print(f"== {method}: reused {done}", flush=True)
        return record
    timing: dict[str, float] = {}
    if not (run / "eval.json").is_file():
        resume = (run / "checkpoints" / "last.pt").is_file()
        print(f"== {method}: {'resuming' if resume else 'training'} {path.name} {' '.join(overrides)}", flush=True)
        start = time.perf_counter()
        train_and_evaluate(cfg, resume=resume, progress=progress)
        timing["train_eval_seconds"] = round(time.perf_counter() - start, 1)
    cascade_file = run / "eval" / f"{CASCADE}.json"
    if not cascade_file.is_file():
        print(f"== {method}: {CASCADE} on the same {args.points or 'all'} points", flush=True)
        start = time.perf_counter()
        evaluate_checkpoint(run, [f"eval.suite={CASCADE}", "eval.checks=false", f"device={args.device}"], name=CASCADE,
                            progress=progress)
        timing["cascade_seconds"] = round(time.perf_counter() - start, 1)
    record = summarise(method, run, timing)
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def summarise(method: str, run: Path, timing: dict[str, float]) -> dict[str, Any]:
    """One method's figures from its run folder (``eval.json``: clean and PGD-20;
    ``eval/apgd_ce_t.json``: the cascade), with the per-point verdicts the contrasts need."""
    trained = json.loads((run / "eval.json").read_text())
    cascade = json.loads((run / "eval" / f"{CASCADE}.json").read_text())
    if trained["points"] != cascade["points"]:
        raise ConfigError(f"{run}: PGD-20 scored {trained['points']} points, the cascade {cascade['points']}")
    metrics = yaml.safe_load((run / "config.yaml").read_text())
    awp = (metrics.get("awp") or {}).get("gamma", 0.0)
    return {
        "clean_acc": trained["clean_acc"], "clean_ci95": trained["clean_ci95"],
        "pgd20_acc": trained["robust_acc"], "pgd20_ci95": trained["robust_ci95"],
        "cascade_acc": cascade["robust_acc"], "cascade_ci95": cascade["robust_ci95"],
        "cascade_after": cascade["after"], "points": trained["points"],
        "select": trained.get("select"), "best_epoch": trained.get("best_epoch"),
        "best_holdout_acc": trained.get("best_holdout_acc"), "epochs": metrics["at"]["epochs"],
        "awp_gamma": awp, "train_seconds": trained.get("train_seconds"), **timing,
        "checks_failed": [c["name"] for c in trained.get("checks", []) if not c["passed"]],
        "stopped": trained.get("stopped"), "run": str(run),
        "verdicts": {"clean": trained["verdicts"]["clean"], "pgd20": trained["verdicts"]["robust"],
                     "cascade": cascade["verdicts"]["robust"]},
    }


def contrasts(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paired contrasts of :data:`CONTRASTS` whose two methods were run."""
    out = []
    for a, b in CONTRASTS:
        if a not in records or b not in records:
            continue
        entry: dict[str, Any] = {"a": a, "b": b}
        for metric, _ in METRICS:
            va = point_verdicts({"verdicts": records[a]["verdicts"]}, metric)
            vb = point_verdicts({"verdicts": records[b]["verdicts"]}, metric)
            entry[metric] = paired_comparison(va, vb).as_dict()
        entry["verdict"] = entry["cascade"]["verdict"]
        out.append(entry)
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def payload(args: argparse.Namespace, records: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    spec = DATASETS[args.dataset]
    scale = {"scale": args.scale, "dataset": args.dataset, "points": args.points, "select": args.select,
             "holdout": args.holdout if args.select == "best" else 0, "awp": args.awp,
             "awp_gamma": AWP_GAMMA if args.awp else 0.0, "threat": spec["threat"] + ["attack.steps=20"]}
    if args.scale == "cpu":
        scale.update({"model": spec["cpu"]["model"], "width": args.width, "train_size": args.train_size,
                      "epochs": args.epochs})
    else:
        scale["budget"] = "each config's own (the papers' models, epochs and schedules)"
    methods = {m: {k: v for k, v in r.items() if k != "verdicts"} for m, r in records.items()}
    return {"scale": scale, "machine": machine(), "study_seconds": round(seconds, 1), "methods": methods,
            "contrasts": contrasts(records)}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render(result: dict[str, Any]) -> str:
    s = result["scale"]
    where = (f"{s['model']} width {s['width']}, {s['train_size']} training images, {s['epochs']} epochs"
             if s["scale"] == "cpu" else s["budget"])
    lines = [f"# Standard AT on {s['dataset']} ({s['scale']} scale)", "",
             f"{where}; deployed epoch: {s['select']}"
             + (f" on {s['holdout']} held-out images" if s["select"] == "best" else "")
             + f"; AWP {'on for ' + ', '.join(AWP_METHODS) if s['awp'] else 'off'}; {s['points'] or 'all'} test "
             f"points, the same for every method; ± is the 95 % binomial half-width.", "",
             "| method | clean % | PGD-20 % | APGD-CE + APGD-T % | best epoch | masking checks | seconds |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for m, r in result["methods"].items():
        checks = "ok" if not r["checks_failed"] else "FAILED: " + ", ".join(r["checks_failed"])
        seconds = round(sum(r.get(k) or 0 for k in ("train_eval_seconds", "cascade_seconds")), 1) or r.get("train_seconds")
        best = f"{r['best_epoch']} of {r['epochs']}" if r.get("best_epoch") else f"{r['epochs']} (last)"
        lines.append(f"| {m} | {pct(r['clean_acc'])} ± {pct(r['clean_ci95'])} | {pct(r['pgd20_acc'])} ± "
                     f"{pct(r['pgd20_ci95'])} | {pct(r['cascade_acc'])} ± {pct(r['cascade_ci95'])} | {best} | {checks} "
                     f"| {seconds} |")
    if result["contrasts"]:
        lines += ["", "Paired contrasts on the shared points (A minus B, percentage points; exact McNemar p, the "
                  "exact 95 % interval given the discordant points):", "",
                  "| A - B | APGD-CE + APGD-T | p | verdict | PGD-20 | p | clean | p |", "|---|---|---:|---|---|---:|---|---:|"]
        for c in result["contrasts"]:
            cells = []
            for metric in ("cascade", "pgd20", "clean"):
                d = c[metric]
                cells.append(f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]")
                cells.append(f"{d['p_value']:.2g}")
                if metric == "cascade":
                    cells.append(d["verdict"])
            lines.append(f"| {c['a']} - {c['b']} | " + " | ".join(cells) + " |")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']} ({m['cores']} cores), {m['threads']} torch thread(s), GPU {m['gpu']}, torch "
              f"{m['torch']}; the whole study: {result['study_seconds']} s in this invocation."]
    return "\n".join(lines) + "\n"


def write_outputs(args: argparse.Namespace, records: dict[str, dict[str, Any]], seconds: float,
                  final: bool) -> dict[str, Any]:
    result = payload(args, records, seconds)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(render(result))
    if final:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n")
        bars = {m: {"clean_acc": r["clean_acc"], "clean_ci95": r["clean_ci95"], "robust_acc": r["cascade_acc"],
                    "robust_ci95": r["cascade_ci95"]} for m, r in records.items()}
        plot_clean_vs_robust(bars, args.out / "clean_vs_robust.png",
                             f"{args.dataset} ({args.scale} scale, {args.points or 'all'} test points)",
                             chance=DATASETS[args.dataset]["chance"], robust_label="robust (APGD-CE + APGD-T)",
                             ylabel="test accuracy (%)")
    return result


def headline(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"dataset": result["scale"]["dataset"], "scale": result["scale"]["scale"],
                           "points": result["scale"]["points"]}
    for m, r in result["methods"].items():
        out.update({f"{m}_clean": round(100 * r["clean_acc"], 1), f"{m}_pgd20": round(100 * r["pgd20_acc"], 1),
                    f"{m}_cascade": round(100 * r["cascade_acc"], 1)})
    for c in result["contrasts"]:
        d = c["cascade"]
        out[f"{c['a']}_minus_{c['b']}"] = {"cascade": round(100 * d["difference"], 1), "p": float(f"{d['p_value']:.2g}"),
                                           "verdict": d["verdict"]}
    out["study_seconds"] = result["study_seconds"]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for method in args.methods:
            shutil.rmtree(args.out / method, ignore_errors=True)
    # Every config is loaded and checked before any training starts (LTD's teacher, which may not
    # exist yet, when LTD starts).
    for method in args.methods:
        extra = [o for o in method_overrides(args, method) if not o.startswith("ltd.teacher=")]
        load_config(config_path(args, method), shared_overrides(args) + extra)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        records[method] = run_method(args, method, progress)
        r = records[method]
        print(json.dumps({method: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                   if k not in ("verdicts", "cascade_after", "run")}}), flush=True)
        write_outputs(args, records, time.perf_counter() - start, final=False)
    result = write_outputs(args, records, time.perf_counter() - start, final=True)
    print(render(result))
    print(json.dumps(headline(result)))


if __name__ == "__main__":
    try:
        main()
    except MetarobustError as exc:  # a refused setting or run folder: the message says what to do
        sys.exit(f"reproduce_at: {exc}")
