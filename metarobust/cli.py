"""The metarobust command line.

    metarobust quickstart                      robust vs plain MAML on the embedded glyphs
    metarobust train CONFIG [key=value ...] [--resume]   CONFIG: a YAML file or a shipped name
    metarobust eval RUN_OR_CHECKPOINT [key=value ...]
    metarobust id RUN_OR_CHECKPOINT [key=value ...]      intrinsic dimension per layer
    metarobust data info DATASET [--root PATH]
    metarobust episodes freeze DATASET [--ways 5 --shots 1 --queries 15 --count 600]
    metarobust blackbox CONFIG [key=value ...]            query-based attacks on a trained run
    metarobust attack blackbox CONFIG [key=value ...]     the same
    metarobust blackbox-train CONFIG [key=value ...]      train MCG's generator on surrogate runs
    metarobust list recipes|models|datasets|attacks|configs
    metarobust seg train|eval ...              few-shot organ segmentation (docs/segmentation.md)
    metarobust --version

Also run as python -m metarobust.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from metarobust import __version__
from metarobust.errors import ConfigError, DataError, MetarobustError, TrainingDiverged, TrainingInterrupted
from metarobust.resources import (
    config_description,
    configs_dir,
    shipped_configs,
    shipped_manifest,
    user_manifest,
)


def _cmd_train(args: argparse.Namespace) -> None:
    from metarobust.evaluation import console_table, headline
    from metarobust.experiment import load_config, train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    if cfg.recipe.startswith("seg_"):  # a segmentation recipe: its own data and evaluation
        args.seg_command, args.target = "train", args.config
        return _cmd_seg(args)
    try:
        summary = train_and_evaluate(cfg, resume=args.resume, progress=not args.quiet)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(f"{exc}:\n  {_train_command(args, [], resume=True)}") from None
    except TrainingDiverged as exc:
        resume = exc.checkpoint_step is not None
        raise TrainingDiverged(f"{exc}:\n  {_train_command(args, exc.advice, resume)}", exc.checkpoint_step,
                               exc.advice) from None
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return
    print(console_table({cfg.recipe: summary}))
    print(json.dumps(headline(summary)))


def _train_command(args: argparse.Namespace, changes: list[str], resume: bool) -> str:
    """The ``metarobust train`` command that continues this one: its config and overrides, with
    ``changes`` (``key=value``) replacing the same keys, and ``--resume`` if a checkpoint exists."""
    keys = {c.split("=", 1)[0] for c in changes}
    overrides = [o for o in args.overrides if o.split("=", 1)[0] not in keys] + list(changes)
    flags = (["--resume"] if resume else []) + (["--quiet"] if args.quiet else [])
    return shlex.join(["metarobust", "train", args.config, *overrides, *flags])


def _cmd_eval(args: argparse.Namespace) -> None:
    """``metarobust eval``: the evaluation the end of training runs, on a run or checkpoint; writes
    ``eval/<name>.json`` into the run folder, never its config."""
    from metarobust.evaluation import console_table, headline
    from metarobust.experiment import evaluate_checkpoint

    summary = evaluate_checkpoint(args.run, args.overrides, name=args.name, progress=not args.quiet)
    print(console_table({summary["recipe"]: summary}))
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


def _cmd_blackbox_train(args: argparse.Namespace) -> None:
    from metarobust.blackbox.mcg.fit import load_train_config, train_generator

    summary = train_generator(load_train_config(args.config, args.overrides), progress=not args.quiet)
    print(json.dumps(summary))


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from metarobust.config import check_output_path
    from metarobust.evaluation import console_table
    from metarobust.experiment import load_config, train_and_evaluate
    from metarobust.plots import plot_clean_vs_robust
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    check_output_path("--out-dir", args.out_dir, "folder")  # the runs and quickstart.png go there
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
        cfg = load_config(configs_dir() / "quickstart.yaml",  # the shipped file, whatever the cwd holds
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


def _cmd_seg(args: argparse.Namespace) -> None:
    """``metarobust seg train CONFIG`` / ``seg eval RUN``: few-shot organ segmentation."""
    from metarobust.evaluation.segmentation import render_table
    from metarobust.seg_experiment import evaluate_seg_run, load_seg_config, train_segmentation

    if args.seg_command == "train":
        result = train_segmentation(load_seg_config(args.target, args.overrides), resume=args.resume,
                                    progress=not args.quiet)
    else:
        result = evaluate_seg_run(args.target, args.overrides, progress=not args.quiet)
    print(render_table(result))
    print(json.dumps({r["attack"] + ("" if r["eps"] is None else f"_{r['eps']:g}_{r['target']}"): round(r["dice"], 4)
                      for r in result["results"]}))


def _cmd_data_info(args: argparse.Namespace) -> None:
    from metarobust.config import DataConfig
    from metarobust.data.datasets import DATASETS, dataset_info

    DATASETS.get(args.dataset, "DATASET")
    info = dataset_info(DataConfig(dataset=args.dataset, root=args.root, image_size=args.image_size,
                                   rotations=args.rotations))
    print(json.dumps(info, indent=2))
    if info["failed"]:  # the report above shows every split; the exit status says it is broken
        first = info["failed"][0]
        raise DataError(f"{args.dataset}: split {first!r} failed to load ({len(info['failed'])} of "
                        f"{len(info['splits'])} failed): {info['splits'][first]['error']}")


def _freeze_output(args: argparse.Namespace) -> Path:
    """Where ``episodes freeze`` writes, checked before any work: ``--out``, else the user's
    episodes folder (never the installed package); an existing file only with ``--force``."""
    from metarobust.data.manifest import manifest_filename

    name = manifest_filename(args.ways, args.shots, args.queries, args.count, args.rotations)
    if args.out is None:
        shipped = shipped_manifest(args.dataset, name)
        if shipped.is_file():  # a user copy would be shadowed by it: training reads the benchmark
            raise ConfigError(
                f"episodes freeze: the benchmark episodes of this shape ship with metarobust ({shipped}) "
                f"and every run is scored on them; for other episodes give --out PATH and train or "
                f"evaluate with eval.manifest=PATH")
        path = user_manifest(args.dataset, name)
    else:
        path = Path(args.out).expanduser()
        if path.is_dir():
            raise ConfigError(f"episodes freeze: --out {str(path)!r} is a directory; give a file "
                              f"path, e.g. --out {path / name}")
    if path.exists() and not args.force:
        raise ConfigError(f"episodes freeze: {path} already exists; pass --force to replace it, or "
                          f"--out PATH to write elsewhere")
    return path


def _cmd_episodes_freeze(args: argparse.Namespace) -> None:
    from metarobust.config import DataConfig
    from metarobust.data.datasets import DATASETS, load_split
    from metarobust.data.manifest import freeze_episodes, save_manifest

    DATASETS.get(args.dataset, "DATASET")
    path = _freeze_output(args)
    data = DataConfig(dataset=args.dataset, root=args.root, rotations=args.rotations)
    store = load_split(data, args.split)
    manifest = freeze_episodes(store, args.ways, args.shots, args.queries, args.count, args.seed,
                               dataset=args.dataset, split=args.split)
    print(f"wrote {len(manifest)} episodes to {save_manifest(manifest, path)}")


def _registry_rows(what: str) -> list[tuple[str, str]]:
    from metarobust.attacks import ATTACKS
    from metarobust.data.datasets import DATASETS
    from metarobust.models import MODELS
    from metarobust.training.recipes import RECIPES

    registry = {"recipes": RECIPES, "models": MODELS, "datasets": DATASETS, "attacks": ATTACKS}[what]
    return list(registry.describe())


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what == "configs":  # shipped files, not a registry: no torch import needed
        rows = [(name, config_description(name)) for name in shipped_configs()]
    else:
        rows = _registry_rows(args.what)
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    if args.what == "attacks":  # the query-based ones take an oracle, not a forward (metarobust blackbox)
        from metarobust.blackbox import BLACKBOX_ATTACKS

        print("\nblack-box (query-based; metarobust blackbox):")
        width = max(width, *(len(n) for n in BLACKBOX_ATTACKS.names()))
        for name, description in BLACKBOX_ATTACKS.describe():
            print(f"{name:<{width}}  {description}")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (ways, shots, queries, episodes)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (a seed)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line help (in the parent's list) is also its --help description."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarobust", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    overrides_help = "dotted config overrides, e.g. meta.train_shots=5 attack.eps=0.0314"
    quiet_help = "no progress bars"
    p = _command(sub, "quickstart", "meta-train robust and plain MAML on the embedded glyphs, "
                                    "evaluate on held-out classes, plot")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--out-dir", default="runs", help="parent folder of the run folders (default: runs)")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_quickstart)

    p = _command(sub, "train", "meta-train a config, then evaluate it on the frozen test episodes")
    p.add_argument("config", help="a YAML file, or the name of a shipped config such as "
                                  "meta/omniglot_rmaml.yaml (metarobust list configs)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_train)

    p = _command(sub, "eval", "clean and robust accuracy of a trained run on the frozen episodes")
    p.add_argument("run", help="a run folder (runs/<name>) or a checkpoint file")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (e.g. attack.steps=20)")
    p.add_argument("--name", default=None, help="the result's name: RUN/eval/<name>.json (default: from the "
                                                "overrides, 'default' for none)")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_eval)

    p = _command(sub, "id", "intrinsic dimension (TwoNN, MLE, PCA) of clean and adversarial "
                            "features per layer of a trained run: table, id.json, id.png")
    p.add_argument("run", help="a run folder (runs/<name>) or a checkpoint file")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (e.g. analysis.points=1000 "
                                                                 "analysis.layers=[penultimate])")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_id)

    blackbox_help = ("query-based black-box attacks (SimBA, Bandits, NES, SignHunter, Square; with MCG: its "
                     "generator's proposal and CG-Attack) on a trained run through a score-only oracle: table, "
                     "blackbox.json, blackbox.png")
    p = sub.add_parser("blackbox", help=blackbox_help)
    p.add_argument("config", help="a YAML file, e.g. configs/blackbox/glyphs_linf.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget=500 run=runs/quickstart/maml")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_blackbox)

    p = _command(sub, "attack", "attack a trained run: 'attack blackbox CONFIG' is 'blackbox CONFIG'")
    p.add_argument("kind", choices=["blackbox"], help="blackbox: " + blackbox_help)
    p.add_argument("config", help="a YAML file, e.g. configs/blackbox/glyphs_linf.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. budget=500 run=runs/quickstart/maml")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_blackbox)

    p = _command(sub, "blackbox-train", "train MCG's meta generator on surrogate runs (MI-FGSM transfer pairs, "
                                        "then Reptile); resumes; writes the checkpoint blackbox's mcg.generator reads")
    p.add_argument("config", help="a YAML file, e.g. configs/blackbox/mcg_train_mnist.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. surrogates=[runs/a] out=runs/g.pt "
                                                "mcg.meta_epochs=1")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_blackbox_train)

    root_help = ("where the dataset's files are (default: $METAROBUST_DATA/DATASET, else "
                 "~/.cache/metarobust/DATASET)")
    dataset_help = "a dataset name (metarobust list datasets)"
    p = _command(sub, "data", "dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = _command(data_sub, "info", "classes and images per split of a dataset; exits non-zero if a "
                                   "split fails to load")
    q.add_argument("dataset", help=dataset_help)
    q.add_argument("--root", default=None, help=root_help)
    q.add_argument("--image-size", type=positive_int, default=None,
                   help="image side (default: the dataset's standard size)")
    q.add_argument("--rotations", action="store_true", help="Omniglot: rotations as new classes")
    q.set_defaults(func=_cmd_data_info)

    p = _command(sub, "episodes", "frozen evaluation episodes")
    ep_sub = p.add_subparsers(dest="episodes_command", required=True, metavar="SUBCOMMAND")
    q = _command(ep_sub, "freeze", "draw test episodes with a fixed seed and write them as a manifest "
                                   "that training and eval read")
    q.add_argument("dataset", help=dataset_help)
    q.add_argument("--root", default=None, help=root_help)
    q.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split whose classes the episodes use (default: test)")
    q.add_argument("--ways", type=positive_int, default=5, help="classes per episode (default: 5)")
    q.add_argument("--shots", type=positive_int, default=1, help="support images per class (default: 1)")
    q.add_argument("--queries", type=positive_int, default=15, help="query images per class (default: 15)")
    q.add_argument("--count", type=positive_int, default=600, help="episodes to draw (default: 600)")
    q.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    q.add_argument("--rotations", action="store_true", help="Omniglot: rotations as new classes")
    q.add_argument("--out", default=None,
                   help="manifest file to write (default: DATASET/test_<ways>way_<shots>shot_<queries>"
                        "query_<count>.json under $METAROBUST_EPISODES, else ~/.cache/metarobust/episodes, "
                        "where training and eval look for it after the shipped benchmark episodes)")
    q.add_argument("--force", action="store_true", help="replace the manifest file if it already exists")
    q.set_defaults(func=_cmd_episodes_freeze)

    p = _command(sub, "seg", "few-shot organ segmentation: train a config (configs/seg/) and score "
                                   "Dice clean and under attack, or re-evaluate a run")
    p.add_argument("seg_command", choices=["train", "eval"], help="train a config, or eval a run")
    p.add_argument("target", help="train: a YAML file (configs/seg/...); eval: a run folder or checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seg.organ=spleen seg.attacks=[pgd,dag]")
    p.add_argument("--resume", action="store_true", help="train: continue the run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=_cmd_seg)

    p = _command(sub, "list", "what the registries hold, or the shipped configs, one name a line")
    p.add_argument("what", choices=["recipes", "models", "datasets", "attacks", "configs"],
                   help="recipes, models, datasets, attacks, or configs (the names train accepts)")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0 done, 1 stdout closed early, else the error's
    ``exit_code`` (2 bad input, 3 a failed gradient-masking check under eval.strict)."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version or a usage error: argparse printed, then exits
            sys.stdout.flush()
            raise
        code = _dispatch(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `metarobust list recipes | head -1`: the Python docs' recipe (signal module, "Note on
        # SIGPIPE"): point stdout at devnull so that the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except KeyboardInterrupt as exc:  # TrainingInterrupted: a checkpoint was written first
        print(f"metarobust: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except MetarobustError as exc:
        print(f"metarobust: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
