"""The ``metarobust`` command line.

    metarobust quickstart                      robust vs plain MAML on the embedded glyphs
    metarobust train CONFIG [key=value ...] [--resume]
    metarobust eval RUN_OR_CHECKPOINT [key=value ...]
    metarobust id RUN_OR_CHECKPOINT [key=value ...]      intrinsic dimension per layer
    metarobust data info DATASET [--root PATH]
    metarobust episodes freeze DATASET [--ways 5 --shots 1 --queries 15 --count 600]
    metarobust blackbox CONFIG [key=value ...]            query-based attacks on a trained run
    metarobust list recipes|models|datasets|attacks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from metarobust.errors import MetarobustError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cmd_train(args: argparse.Namespace) -> None:
    from metarobust.evaluation import console_table, headline
    from metarobust.experiment import load_config, train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    summary = train_and_evaluate(cfg, resume=args.resume, progress=not args.quiet)
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return
    print(console_table({cfg.recipe: summary}))
    print(json.dumps(headline(summary)))


def _cmd_eval(args: argparse.Namespace) -> None:
    """``metarobust eval``: the evaluation the end of training runs, on a run or checkpoint."""
    from metarobust.evaluation import console_table, headline
    from metarobust.experiment import evaluate, model_from_checkpoint
    from metarobust.runs import RunDir
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    cfg, model, state = model_from_checkpoint(args.run, args.overrides)
    recipe = build_recipe(cfg)
    data = load_training_data(cfg, recipe, resolve_device(cfg.device))
    run_path = Path(args.run)
    run = None
    if run_path.is_dir():
        cfg.out_dir, cfg.name = str(run_path.parent), run_path.name
        run = RunDir(cfg, resume=True, tensorboard=False)
    result = evaluate(cfg, model, recipe, data.test, run, progress=not args.quiet, step=int(state["step"]))
    result.run = str(run_path)
    summary = result.as_dict()
    print(console_table({cfg.recipe: summary}))
    print(json.dumps(headline(summary)))


def _cmd_id(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from metarobust.analysis.run_analysis import analyse_run, id_headline, id_table

    bar = None if args.quiet else (lambda it: tqdm(it, desc="id: episodes", dynamic_ncols=True))
    _, report, paths = analyse_run(args.run, args.overrides, bar)
    print(id_table(report))
    print(f"json: {paths['json']}\nplot: {paths['plot']}")
    print(json.dumps(id_headline(report)))


def _cmd_blackbox(args: argparse.Namespace) -> None:
    from metarobust.blackbox.run import blackbox_headline, blackbox_table, load_blackbox_config, run_blackbox

    cfg = load_blackbox_config(args.config, args.overrides)
    report = None if args.quiet else (lambda name, r: print(f"{name}: {100 * r['success_rate']:.1f}% "
                                                              f"of {r['attacked']} attacked", flush=True))
    summary, paths = run_blackbox(cfg, report)
    print(blackbox_table(summary))
    print(f"json: {paths['json']}\nplot: {paths['plot']}")
    print(json.dumps(blackbox_headline(summary)))


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from metarobust.evaluation import console_table
    from metarobust.experiment import load_config, train_and_evaluate
    from metarobust.plots import plot_clean_vs_robust
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    start = time.perf_counter()
    base = Path(args.out_dir)
    out = base / "quickstart"
    suffix = 1
    while out.exists():
        suffix += 1
        out = base / f"quickstart-{suffix}"
    results = {}
    data = None
    for recipe in ("r_maml", "maml"):
        cfg = load_config(CONFIGS / "quickstart.yaml",
                          [f"recipe={recipe}", f"name={recipe}", f"out_dir={out}", *args.overrides])
        data = data or load_training_data(cfg, build_recipe(cfg), resolve_device(cfg.device))
        print(f"== meta-training {recipe} ({cfg.train.iterations} meta-updates, "
              f"{cfg.meta.ways}-way, {cfg.meta.train_shots}-shot training, "
              f"{cfg.meta.test_shots}-shot test) ==", flush=True)
        results[recipe] = train_and_evaluate(cfg, progress=not args.quiet, data=data)
    chance = 1 / cfg.meta.ways
    title = (f"{cfg.data.dataset}: {cfg.meta.ways}-way {cfg.meta.test_shots}-shot, held-out classes\n"
             f"robust = PGD-{cfg.attack.steps}, eps {cfg.attack.eps:.3g}")
    plot = plot_clean_vs_robust(results, out / "quickstart.png", title, chance)
    print(console_table(results))
    print(f"plot: {plot}\nruns: {out}")
    headline = {"dataset": cfg.data.dataset, "ways": cfg.meta.ways, "test_shots": cfg.meta.test_shots,
                "train_shots": cfg.meta.train_shots, "eps": round(cfg.attack.eps, 5), "chance": chance}
    for recipe, r in results.items():
        headline[f"{recipe}_clean_acc"] = round(r["clean_acc"], 4)
        headline[f"{recipe}_robust_acc"] = round(r["robust_acc"], 4)
    headline["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(headline))


def _cmd_data_info(args: argparse.Namespace) -> None:
    from metarobust.config import DataConfig
    from metarobust.data.datasets import DATASETS, dataset_info

    DATASETS.get(args.dataset, "DATASET")
    info = dataset_info(DataConfig(dataset=args.dataset, root=args.root, image_size=args.image_size,
                                   rotations=args.rotations))
    print(json.dumps(info, indent=2))


def _cmd_episodes_freeze(args: argparse.Namespace) -> None:
    from metarobust.config import DataConfig
    from metarobust.data.datasets import load_split
    from metarobust.data.manifest import default_manifest_path, freeze_episodes, save_manifest

    data = DataConfig(dataset=args.dataset, root=args.root, rotations=args.rotations)
    store = load_split(data, args.split)
    manifest = freeze_episodes(store, args.ways, args.shots, args.queries, args.count, args.seed,
                               dataset=args.dataset, split=args.split)
    path = args.out or default_manifest_path(args.dataset, args.ways, args.shots, args.queries,
                                             args.count, args.rotations)
    print(f"wrote {len(manifest)} episodes to {save_manifest(manifest, path)}")


def _cmd_list(args: argparse.Namespace) -> None:
    from metarobust.attacks import ATTACKS
    from metarobust.data.datasets import DATASETS
    from metarobust.models import MODELS
    from metarobust.training.recipes import RECIPES

    registry = {"recipes": RECIPES, "models": MODELS, "datasets": DATASETS, "attacks": ATTACKS}[args.what]
    width = max(len(n) for n in registry.names())
    for name, description in registry.describe():
        print(f"{name:<{width}}  {description}")
    if args.what == "attacks":  # the query-based ones take an oracle, not a forward (metarobust blackbox)
        from metarobust.blackbox import BLACKBOX_ATTACKS

        print("\nblack-box (query-based; metarobust blackbox):")
        width = max(width, *(len(n) for n in BLACKBOX_ATTACKS.names()))
        for name, description in BLACKBOX_ATTACKS.describe():
            print(f"{name:<{width}}  {description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarobust", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    overrides_help = "dotted config overrides, e.g. meta.train_shots=5 attack.eps=0.0314"
    p = sub.add_parser("quickstart", help="meta-train robust and plain MAML on the embedded glyphs, "
                                          "evaluate on held-out classes, plot")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out-dir", default="runs", help="parent folder of the run folders (default: runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("train", help="meta-train a config, then evaluate it on the frozen test episodes")
    p.add_argument("config", help="a YAML file, e.g. configs/meta/omniglot_rmaml.yaml")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="clean and robust accuracy of a trained run on the frozen episodes")
    p.add_argument("run", help="a run folder (runs/<name>) or a checkpoint file")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (e.g. attack.steps=20)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("id", help="intrinsic dimension (TwoNN, MLE, PCA) of clean and adversarial "
                                  "features per layer of a trained run: table, id.json, id.png")
    p.add_argument("run", help="a run folder (runs/<name>) or a checkpoint file")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (e.g. analysis.points=1000 "
                                                                 "analysis.layers=[penultimate])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_id)

    p = sub.add_parser("blackbox", help="query-based black-box attacks (SimBA, Bandits, NES, SignHunter) on a "
                                        "trained run through a score-only oracle: table, blackbox.json, blackbox.png")
    p.add_argument("config", help="a YAML file, e.g. configs/blackbox/glyphs_linf.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget=500 run=runs/quickstart/maml")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_blackbox)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("info", help="classes and images per split of a dataset")
    q.add_argument("dataset", help="a dataset name (metarobust list datasets)")
    q.add_argument("--root", default=None, help="where the dataset's files are")
    q.add_argument("--image-size", type=int, default=None,
                   help="image side (default: the dataset's standard size)")
    q.add_argument("--rotations", action="store_true", help="Omniglot: rotations as new classes")
    q.set_defaults(func=_cmd_data_info)

    p = sub.add_parser("episodes", help="frozen evaluation episodes")
    ep_sub = p.add_subparsers(dest="episodes_command", required=True, metavar="SUBCOMMAND")
    q = ep_sub.add_parser("freeze", help="write a manifest of test episodes into episodes/<dataset>/")
    q.add_argument("dataset", help="a dataset name (metarobust list datasets)")
    q.add_argument("--root", default=None)
    q.add_argument("--split", default="test", choices=["train", "val", "test"])
    q.add_argument("--ways", type=int, default=5)
    q.add_argument("--shots", type=int, default=1)
    q.add_argument("--queries", type=int, default=15)
    q.add_argument("--count", type=int, default=600)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--rotations", action="store_true")
    q.add_argument("--out", default=None, help="manifest path (default: episodes/<dataset>/test_...json)")
    q.set_defaults(func=_cmd_episodes_freeze)

    p = sub.add_parser("list", help="what the registries hold, one name a line")
    p.add_argument("what", choices=["recipes", "models", "datasets", "attacks"])
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MetarobustError as exc:
        print(f"metarobust: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
