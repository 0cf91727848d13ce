"""CPU-scale evidence for few-shot organ segmentation on the staged CHAOS-T2 (docs/segmentation.md).

For each held-out organ (setting 2) and each method (PANet, AT-PANet, PNODE, R-PNODE), train from
``configs/seg/chaos_t2_cpu.yaml`` in the one trainer and score the 3-D Dice per test volume, clean
and under the evaluation attacks; then write ``<out>/results.json``, ``<out>/results.md`` (one
table, mean ± 95 % interval over test volumes), a bar chart and one overlay PNG. Resumable: a
finished (organ, method) pair is read back from its run folder's ``seg_eval.json``; an
unfinished run starts again::

    OMP_NUM_THREADS=1 nohup python scripts/seg_chaos_evidence.py --iterations 150 &

``key=value`` arguments override the config for every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("seg_panet", "seg_at_panet", "seg_pnode", "seg_r_pnode")
ORGANS = ("liver", "left_kidney", "spleen")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/seg/chaos_t2_cpu.yaml"))
    parser.add_argument("--root", default=str(ROOT.parent / "shared/data/chaos-t2/chaos_t2_png.tar"))
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--organs", default=",".join(ORGANS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--attacks", default="fgsm,pgd")
    parser.add_argument("--out", default=str(ROOT / "docs/seg_chaos_cpu"))
    parser.add_argument("--runs", default=str(ROOT / "runs/seg_chaos_cpu"))
    parser.add_argument("--report-only", action="store_true", help="write the table of the finished runs only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from metarobust.seg_experiment import load_seg_config, load_seg_volumes, train_segmentation

    torch.set_num_threads(1)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    volumes = None
    results = []
    for organ in args.organs.split(","):
        for method in args.methods.split(","):
            name = f"{organ}_{method}"
            done = runs / name / "seg_eval.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                continue
            if args.report_only:
                continue
            if (runs / name).exists():
                shutil.rmtree(runs / name)  # an interrupted run starts again
            cfg = load_seg_config(args.config, [f"recipe={method}", f"seg.organ={organ}", f"seg.root={args.root}",
                                                f"train.iterations={args.iterations}",
                                                f"train.checkpoint_every={args.iterations}",
                                                f"seg.attacks=[{args.attacks}]", f"out_dir={runs}", f"name={name}",
                                                *args.overrides])
            if volumes is None:
                volumes = load_seg_volumes(cfg)
            start = time.perf_counter()
            result = train_segmentation(cfg, progress=False, volumes=volumes)
            print(f"{name}: {time.perf_counter() - start:.0f} s, clean Dice "
                  f"{next(r['dice'] for r in result['results'] if r['attack'] == 'clean'):.3f}", flush=True)
            results.append(result)
            write(results, out, runs)
    write(results, out, runs)


def write(results: list[dict], out: Path, runs: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| held-out organ | method | clean | " + " | ".join(_attack_names(results)) + " | NFE (clean) | train s |",
             "|---|---|---:|" + "---:|" * len(_attack_names(results)) + "---:|---:|"]
    seen_baselines = set()
    for r in results:
        rows = {(x["attack"], x["eps"], x["target"]): x for x in r["results"]}
        if r["organ"] not in seen_baselines:
            seen_baselines.add(r["organ"])
            for base in ("all_background", "copy_support"):
                x = rows[(base, None, "-")]
                lines.append(f"| {r['organ']} | *{base}* | {x['dice']:.3f} ± {x['dice_ci95']:.3f} | "
                             + " | ".join("" for _ in _attack_names(results)) + " | | |")
        clean = rows[("clean", None, "-")]
        cells = []
        for key in _attack_keys(results):
            x = rows.get(key)
            cells.append("" if x is None else f"{x['dice']:.3f} ± {x['dice_ci95']:.3f}")
        nfe = f"{clean['nfe_mean']:.1f}" if "nfe_mean" in clean else ""
        lines.append(f"| {r['organ']} | {r['recipe']} | {clean['dice']:.3f} ± {clean['dice_ci95']:.3f} | "
                     + " | ".join(cells) + f" | {nfe} | {r.get('train_seconds', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "dice.png")
    first = next((runs / f"{r['organ']}_{r['recipe']}" / "seg_overlays.png" for r in results
                  if r["recipe"] == "seg_pnode"), None)
    if first is not None and first.is_file():
        shutil.copy(first, out / "overlays_pnode.png")


def _attack_keys(results):
    keys = []
    for r in results:
        for x in r["results"]:
            key = (x["attack"], x["eps"], x["target"])
            if x["attack"] not in ("clean", "all_background", "copy_support") and key not in keys:
                keys.append(key)
    return keys


def _attack_names(results):
    return [f"{a} {'' if e is None else f'{e:g}'} ({t})" for a, e, t in _attack_keys(results)]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = list(dict.fromkeys(r["organ"] for r in results))
    methods = list(dict.fromkeys(r["recipe"] for r in results))
    settings = [("clean", None, "-")] + _attack_keys(results)
    fig, axes = plt.subplots(1, len(organs), figsize=(4.2 * len(organs), 3.2), squeeze=False)
    for ax, organ in zip(axes[0], organs):
        width = 0.8 / max(len(settings), 1)
        for j, key in enumerate(settings):
            means, cis = [], []
            for m in methods:
                r = next((r for r in results if r["organ"] == organ and r["recipe"] == m), None)
                x = None if r is None else next((x for x in r["results"] if (x["attack"], x["eps"], x["target"]) == key), None)
                means.append(0 if x is None else x["dice"])
                cis.append(0 if x is None or x["dice_ci95"] != x["dice_ci95"] else x["dice_ci95"])
            ax.bar([i + j * width for i in range(len(methods))], means, width, yerr=cis, capsize=2,
                   label=key[0] if key[1] is None else f"{key[0]} {key[1]:g}")
        copy = next(x["dice"] for r in results if r["organ"] == organ for x in r["results"] if x["attack"] == "copy_support")
        ax.axhline(copy, color="k", ls="--", lw=0.8, label="copy support mask")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))])
        ax.set_xticklabels([m.replace("seg_", "") for m in methods], fontsize=7)
        ax.set_title(f"held-out {organ}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel("3-D Dice")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
