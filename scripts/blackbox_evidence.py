"""Evidence for MCG: every black-box attack with and without MCG's generator, on one target.

1. Trains, with our own recipes (``metarobust train``'s machinery, resumable run folders), a
   *target* and two *surrogates*. Plain classifiers (``--dataset mnist|cifar10``, through
   ``configs/at/<dataset>_natural.yaml``): one surrogate of another architecture, one of the
   target's architecture from another initialisation (seed) and another subset of the training
   images. Few-shot (``--dataset omniglot``): three non-robust few-shot learners of one kind
   (``--learner rfs``, the default, through ``configs/meta/omniglot_rfs.yaml``; or ``maml``) that
   differ in seed and width; the surrogates are adapted to each episode's support set
   (docs/blackbox.md, "MCG on few-shot targets").
2. Trains MCG's generator on the surrogates (``metarobust blackbox-train``'s
   :func:`~metarobust.blackbox.mcg.fit.train_generator`: MI-FGSM transfer pairs on training
   images, or, few-shot, on the query sets of seeded training episodes with every surrogate
   fine-tuned on each support set; stage 1, stage 2; it resumes after a kill).
3. Runs every attack twice on the same clean-correct test points with the same budget and seed
   (``metarobust blackbox`` with ``mcg.enabled``): plain, and ``mcg+<attack>`` (the generator's
   one charged proposal, then the attack from it). Also the white-box APGD-CE-100 masking check.
   Few-shot: the points are the query sets of the first ``--episodes`` frozen test episodes, the
   target fine-tuned on each support set, one oracle per episode.

Writes ``<out>/`` (the runs, ``generator.pt``, ``blackbox/blackbox.json`` and ``.png``,
``evidence.json``; few-shot also ``episodes.json``, the frozen test episodes) and the committed
summary ``--results`` (default ``docs/results/blackbox_<dataset>.json``: per attack success rate,
mean/median queries and FASR without and with MCG, and the query ratio; the target's kind), and
ends with one JSON line.

Scale (``--dataset mnist``, the defaults): TRADES' small CNN (width 32) as the target, Conv-4
(width 32, running batch norm) and a second small CNN (another seed and subset) as surrogates,
each trained naturally for 4 epochs on 30,000 images; the generator (c-Glow, 2 levels of 4
steps, width 64; MCG's attack-time settings) on 5,000 training images (MI-FGSM-30 pairs from
both surrogates, 10 NLL epochs, 3 Reptile epochs); attacks at L-inf 0.3 with 1,000 queries on
200 test points (the clean-correct ones are attacked). Sized for about 30 minutes of one core
from measured unit costs (docs/blackbox.md; it took 49 with both cores busy). ``--tiny`` checks
the pipeline in under a minute (its numbers are not evidence). ``--dataset cifar10`` is defined
but neither run nor timed.

Scale (``--dataset omniglot``, few-shot, the staged small Omniglot: 3,500 training images of
175 classes, 860 test images of 43): ``--learner rfs`` (default): RFS pre-trained for 30 epochs
(its config's SGD, x0.1 at 3/4) as the target (Conv-4 width 32, seed 0) and surrogates (width 32
seed 1; width 16 seed 2), each fitting its logistic probe on an episode's support set; every run
scored on 20 frozen 5-way 1-shot 15-query test episodes (PGD-10 at 0.1, no checks). The
generator (MNIST's c-Glow sizes) on 50 seeded training episodes of the attacked shape (75 query
images each; MI-FGSM-30 pairs from both adapted surrogates, 5 NLL epochs, 2 Reptile epochs, one
task per episode; the confidence window is [0, 1]: RFS's 1-shot logistic probe is flat, its top
softmax about 0.25-0.3, so MCG's (0.5, 1] would keep no image); attacks at L-inf 0.1 (at 8/255
the RFS target kept 69 % under white-box PGD-10, leaving the query attacks little to find) with
1,000 queries on the query sets of the first 4
frozen test episodes (300 points). ``--learner maml`` takes the shots study's MAML substrate
(5-way 1-shot, first order, one inner step at lr 0.4, three at test, meta-batch 4) for
``--iterations`` meta-updates; MAML's transductive batch norm makes its oracle batch-coupled (each
query scored inside its 75-image clean query set: about 63 ms per point-query on a loaded core,
of the order of 10-25 hours of attacks on one core), so it is for a GPU; RFS's running batch norm
costs one image's forward per query. ``--tiny`` runs the pipeline in about 30 seconds.

    python scripts/blackbox_evidence.py --dataset mnist                 # ~30 min, one core
    python scripts/blackbox_evidence.py --dataset mnist --resume        # after a kill: continue
    python scripts/blackbox_evidence.py --dataset mnist --tiny --out /tmp/bbe --results /tmp/bbe.json
    python scripts/blackbox_evidence.py --dataset omniglot              # RFS learners
    python scripts/blackbox_evidence.py --dataset omniglot --learner maml --device cuda   # for a GPU
    python scripts/blackbox_evidence.py --dataset omniglot --tiny --out /tmp/bbo --results /tmp/bbo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metarobust.blackbox.mcg.fit import MCGTrainConfig, train_generator  # noqa: E402
from metarobust.blackbox.run import BlackboxConfig, MCGSection, blackbox_table, run_blackbox  # noqa: E402
from metarobust.config import EPS_8  # noqa: E402
from metarobust.experiment import load_config, train_and_evaluate  # noqa: E402
from metarobust.resources import configs_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ATTACKS = ("simba", "simba_dct", "bandits", "nes", "signhunter", "square")

DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {
        "kind": "classifier", "config": "at/mnist_natural.yaml", "staged": SHARED / "mnist", "eps": 0.3, "lr": 0.01,
        "models": {"target": ["model.name=small_cnn", "model.hidden=32", "seed=0"],
                   "surrogate_conv4": ["model.name=conv4", "model.hidden=32", "model.batch_norm=running", "seed=1"],
                   "surrogate_cnn": ["model.name=small_cnn", "model.hidden=32", "seed=2"]},
        "generator": {"levels": 2, "steps": 4, "hidden": 64, "x_hidden_channels": 16, "x_hidden_size": 64},
        "params": {"bandits": {"tile": 4}, "nes": {"sigma": 0.01}},
        "full": {"epochs": 4, "train_size": 30000, "images": 5000, "points": 200, "budget": 1000,
                 "mcg": {"pretrain_epochs": 10, "meta_epochs": 3}},
    },
    "cifar10": {
        "kind": "classifier", "config": "at/cifar10_natural.yaml", "staged": SHARED / "cifar10-jpg" / "cifar10_jpg.tar.gz",
        "eps": EPS_8, "lr": 0.1,
        "models": {"target": ["model.name=preact_resnet18", "model.hidden=8", "seed=0"],
                   "surrogate_conv4": ["model.name=conv4", "model.hidden=32", "model.batch_norm=running", "seed=1"],
                   "surrogate_resnet": ["model.name=preact_resnet18", "model.hidden=8", "seed=2"]},
        "generator": {"levels": 3, "steps": 4, "hidden": 64, "x_hidden_channels": 16, "x_hidden_size": 64},
        "params": {"bandits": {"tile": 2}, "nes": {"sigma": 0.01}},
        "full": {"epochs": 15, "train_size": 20000, "images": 3000, "points": 120, "budget": 1000,
                 "mcg": {"transfer_steps": 10, "pretrain_epochs": 5, "meta_epochs": 2}},
    },
    "omniglot": {
        "kind": "fewshot", "staged": SHARED / "omniglot", "eps": 0.1,
        "learners": {  # --learner: the configs the three models override
            "rfs": {"config": "meta/omniglot_rfs.yaml",
                    "models": {"target": ["model.hidden=32", "seed=0"],
                               "surrogate_rfs_s1": ["model.hidden=32", "seed=1"],
                               "surrogate_rfs_w16": ["model.hidden=16", "seed=2"]}},
            "maml": {"config": "meta/omniglot_maml.yaml",
                     "models": {"target": ["recipe=maml", "model.hidden=32", "seed=0"],
                                "surrogate_maml_s1": ["recipe=maml", "model.hidden=32", "seed=1"],
                                "surrogate_maml_w16": ["recipe=maml", "model.hidden=16", "seed=2"]}}},
        "generator": {"levels": 2, "steps": 4, "hidden": 64, "x_hidden_channels": 16, "x_hidden_size": 64},
        "params": {"bandits": {"tile": 4}, "nes": {"sigma": 0.01}},
        "full": {"learner": "rfs", "iterations": 1000, "epochs": 30, "eval_episodes": 20, "episodes": 4, "queries": 15,
                 "train_episodes": 50, "budget": 1000,
                 "mcg": {"pretrain_epochs": 5, "meta_epochs": 2, "confidence": [0.0, 1.0]}},
    },
}
"""Per dataset: the kind of target (``classifier`` or ``fewshot``), the recipe config the models
override, the staged copy, the threat model, the three models, the CPU-scale generator, attack
settings and budgets."""

FEWSHOT = {"ways": 5, "shots": 1}
"""The few-shot episodes that are frozen, attacked and (for the generator) drawn from the training
split: 5-way 1-shot with ``--queries`` per class (15: 75 query images each)."""

SUBSTRATE = ["model.name=conv4", f"meta.ways={FEWSHOT['ways']}", f"meta.train_shots={FEWSHOT['shots']}",
             f"meta.test_shots={FEWSHOT['shots']}", "meta.queries=5", "meta.inner_lr=0.4", "meta.inner_steps=1",
             "meta.test_inner_steps=3", "meta.first_order=true", "meta.meta_batch_size=4"]
"""The shots study's Omniglot substrate (``configs/meta/shots_study_omniglot.yaml``), at which
MAML converges in minutes on one core; training episodes have 5 queries per class, the frozen test
episodes ``--queries`` (15). MAML's transductive batch norm stays (without it this Conv-4 did not
train: the loss sat at ln 5 for 300 meta-updates), so the oracle is batch-coupled: every query is
scored inside its clean query set (75 images per query point)."""

SCALE_KEYS = {"classifier": ("epochs", "train_size", "images", "points", "budget"),
              "fewshot": ("learner", "iterations", "epochs", "eval_episodes", "episodes", "queries", "train_episodes",
                          "budget")}
"""The scale flags each kind of target reads (the others are refused)."""

TINY = {"learner": "rfs", "epochs": 2, "train_size": 2048, "images": 64, "points": 8, "budget": 20,
        "iterations": 20, "eval_episodes": 2, "episodes": 1, "queries": 2, "train_episodes": 2,
        "mcg": {"transfer_steps": 2, "pretrain_epochs": 1, "meta_epochs": 1, "glow_steps": 1, "confidence": [0.0, 1.0]}}
TINY_GENERATOR = {"steps": 1, "hidden": 8, "x_hidden_channels": 4, "x_hidden_size": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    parser.add_argument("--tiny", action="store_true", help="a pipeline check in minutes (not evidence)")
    parser.add_argument("--epochs", type=int, help="classifiers, and few-shot rfs: training epochs of the target and "
                        "surrogates")
    parser.add_argument("--train-size", type=int, help="classifiers: training images of each model")
    parser.add_argument("--images", type=int, help="classifiers: training images for the generator")
    parser.add_argument("--points", type=int, help="classifiers: test points attacked")
    parser.add_argument("--learner", choices=("rfs", "maml"), help="few-shot: the learners (default rfs: a query "
                        "costs one image's forward; maml's transductive batch norm scores each query inside its "
                        "75-image query set)")
    parser.add_argument("--iterations", type=int, help="few-shot, maml: meta-updates of the target and surrogates")
    parser.add_argument("--eval-episodes", type=int, help="few-shot: frozen test episodes (each run is scored on all)")
    parser.add_argument("--episodes", type=int, help="few-shot: frozen test episodes attacked (75 query points each)")
    parser.add_argument("--queries", type=int, help="few-shot: query images per class of the frozen and generator "
                        "episodes")
    parser.add_argument("--train-episodes", type=int, help="few-shot: training episodes for the generator")
    parser.add_argument("--budget", type=int, help="queries per attacked point")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated black-box attacks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--resume", action="store_true", help="reuse what is done (also the default)")
    parser.add_argument("--fresh", action="store_true", help="delete the study folder first")
    parser.add_argument("--data-root", help="the dataset's files (default: the staged copy in ../shared/data)")
    parser.add_argument("--out", help="the study's folder (default runs/blackbox_evidence_<dataset>)")
    parser.add_argument("--results", help="the committed summary (default docs/results/blackbox_<dataset>.json)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.resume and args.fresh:
        parser.error("--resume and --fresh contradict each other")
    spec = DATASETS[args.dataset]
    scale = TINY if args.tiny else spec["full"]
    keys = SCALE_KEYS[spec["kind"]]
    for other in {k for ks in SCALE_KEYS.values() for k in ks} - set(keys):
        if getattr(args, other) is not None:
            parser.error(f"--{other.replace('_', '-')} does not apply to --dataset {args.dataset} "
                         f"({spec['kind']}); its scale flags: {', '.join('--' + k.replace('_', '-') for k in keys)}")
    for key in keys:
        if getattr(args, key) is None:
            setattr(args, key, scale[key])
    if spec["kind"] == "fewshot" and args.episodes > args.eval_episodes:
        parser.error(f"--episodes={args.episodes} attacked, but only --eval-episodes={args.eval_episodes} are frozen; "
                     f"attack at most that many")
    args.mcg = scale["mcg"]
    args.generator = {**spec["generator"], **(TINY_GENERATOR if args.tiny else {})}
    args.attacks = [a for a in args.attacks.split(",") if a]
    staged = spec["staged"]
    args.data_root = args.data_root or (str(staged) if staged.exists() else None)
    if args.data_root is None:
        parser.error(f"--data-root: no {args.dataset} files found (the staged {staged} is absent)")
    args.out = Path(args.out or f"runs/blackbox_evidence_{args.dataset}")
    args.results = Path(args.results or ROOT / "docs" / "results" / f"blackbox_{args.dataset}.json")
    return args


def learner_spec(args: argparse.Namespace) -> dict[str, Any]:
    """``{"config", "models"}`` of the run: the dataset's, or for few-shot the ``--learner``'s."""
    spec = DATASETS[args.dataset]
    return spec["learners"][args.learner] if "learners" in spec else spec


def classifier_overrides(args: argparse.Namespace) -> list[str]:
    """A natural classifier's scale: ``args.epochs`` on ``args.train_size`` images, scored on
    ``args.points`` test points."""
    spec = DATASETS[args.dataset]
    return [f"at.train_size={args.train_size}", f"at.epochs={args.epochs}", "at.holdout=0", "at.select=last",
            "at.batch_size=128", f"optim.lr={spec['lr']}", "optim.schedule=piecewise",
            f"optim.milestones=[{0.75 * args.epochs}]", f"train.checkpoint_every={max(1, args.train_size // 128)}",
            f"eval.points={args.points}"]


def fewshot_overrides(args: argparse.Namespace) -> list[str]:
    """A few-shot learner's scale, scored on the study's frozen test episodes
    (:func:`frozen_episodes`): RFS pre-trains ``args.epochs`` epochs (SGD as its config, x0.1 at
    3/4), MAML runs :data:`SUBSTRATE` for ``args.iterations`` meta-updates."""
    if args.learner == "rfs":
        return [f"at.epochs={args.epochs}", "optim.schedule=piecewise", f"optim.milestones=[{0.75 * args.epochs}]",
                "train.checkpoint_every=200", f"meta.ways={FEWSHOT['ways']}", f"meta.test_shots={FEWSHOT['shots']}",
                *episode_overrides(args)]
    return [*SUBSTRATE, f"train.iterations={args.iterations}",
            f"train.checkpoint_every={max(1, args.iterations // 4)}", *episode_overrides(args)]


def episode_overrides(args: argparse.Namespace) -> list[str]:
    """The frozen test episodes every few-shot run is scored and attacked on."""
    return [f"eval.manifest={args.out / 'episodes.json'}", f"eval.episodes={args.eval_episodes}"]


def frozen_episodes(args: argparse.Namespace) -> Path:
    """Freeze (once; seed 0) ``args.eval_episodes`` :data:`FEWSHOT`-shaped episodes of the test
    split into ``<out>/episodes.json``: every run is scored on them, the first ``args.episodes``
    are attacked."""
    from metarobust.data.datasets import load_split
    from metarobust.data.manifest import freeze_episodes, save_manifest

    path = args.out / "episodes.json"
    if not path.is_file():
        data = load_config(configs_dir() / learner_spec(args)["config"], [f"data.root={args.data_root}"]).data
        save_manifest(freeze_episodes(load_split(data, "test"), FEWSHOT["ways"], FEWSHOT["shots"], args.queries,
                                      args.eval_episodes, seed=0, dataset=args.dataset), path)
    return path


def train_model(args: argparse.Namespace, name: str, extra: list[str]) -> tuple[Path, float]:
    """Train (or resume, or reuse) one natural model or meta-learner: its run folder and the
    seconds spent."""
    spec = DATASETS[args.dataset]
    run = args.out / name
    if (run / "eval.json").is_file():
        print(f"== {name}: reused {run}", flush=True)
        return run, 0.0
    scale = classifier_overrides(args) if spec["kind"] == "classifier" else fewshot_overrides(args)
    overrides = [*scale, *extra, f"name={name}", f"out_dir={args.out}", f"data.root={args.data_root}",
                 f"device={args.device}", f"attack.eps={spec['eps']}", "attack.steps=10", f"attack.step_size={2.5 * spec['eps'] / 10}",
                 "eval.checks=false"]
    cfg = load_config(configs_dir() / learner_spec(args)["config"], overrides)
    resume = (run / "checkpoints" / "last.pt").is_file()
    print(f"== {name}: {'resuming' if resume else 'training'} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    train_and_evaluate(cfg, resume=resume, progress=True)
    return run, time.perf_counter() - start


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("dataset", "tiny", *SCALE_KEYS[DATASETS[args.dataset]["kind"]], "attacks", "mcg", "generator")
    return {**{k: getattr(args, k) for k in keys}, "eps": DATASETS[args.dataset]["eps"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = DATASETS[args.dataset]
    settings = settings_of(args)
    saved = args.out / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{args.out} was made with other settings ({saved}); use --fresh or another --out")
    saved.write_text(json.dumps(settings, indent=2) + "\n")
    start, seconds = time.perf_counter(), {}
    fewshot = spec["kind"] == "fewshot"
    if fewshot:
        frozen_episodes(args)

    runs = {}
    for name, extra in learner_spec(args)["models"].items():
        runs[name], seconds[f"train_{name}"] = train_model(args, name, extra)
    target, surrogates = runs.pop("target"), [str(p) for p in runs.values()]

    t = time.perf_counter()
    # Few-shot: the generator's training episodes take the attacked shape (--queries per class,
    # not the runs' 5 training queries); the target is attacked on the runs' frozen episodes.
    data = [f"device={args.device}", f"data.root={args.data_root}"]
    size = {"episodes": args.train_episodes} if fewshot else {"images": args.images}
    gen_cfg = MCGTrainConfig(surrogates=surrogates, out=str(args.out / "generator.pt"), norm="linf", eps=spec["eps"],
                             **size, generator=args.generator, mcg=args.mcg, seed=0,
                             overrides=[*data, *([f"meta.queries={args.queries}"] if fewshot else [])])
    gen_cfg.check()
    generator = train_generator(gen_cfg)
    seconds["generator"] = time.perf_counter() - t

    t = time.perf_counter()
    done = args.out / "blackbox" / "blackbox.json"
    points = {"episodes": args.episodes} if fewshot else {"points": args.points}
    bb = BlackboxConfig(run=str(target), attacks=args.attacks, norm="linf", eps=spec["eps"], budget=args.budget,
                        **points, seed=0, params=spec["params"], whitebox_check=True,
                        overrides=[*data, *(episode_overrides(args) if fewshot else [])],
                        out=str(args.out / "blackbox"),
                        mcg=MCGSection(enabled=True, generator=gen_cfg.out, surrogates=surrogates))
    bb.check()
    if done.is_file():
        summary = json.loads(done.read_text())
        print(f"== attacks: reused {done}", flush=True)
    else:
        summary, _ = run_blackbox(bb, lambda name, r: print(f"{name}: {100 * r['success_rate']:.1f}% of "
                                                            f"{r['attacked']}, mean q {r['mean_queries']}", flush=True))
        seconds["attacks"] = time.perf_counter() - t
    print(blackbox_table(summary))

    result = evidence(args, summary, generator, seconds, time.perf_counter() - start)
    text = json.dumps(result, indent=2) + "\n"
    (args.out / "evidence.json").write_text(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    line = {"dataset": args.dataset, "tiny": args.tiny, "target": result["target"]["kind"],
            "points": result["points"], "clean_acc": result["clean_acc"],
            "whitebox_apgd": result["whitebox"]["success_rate"], "masking_suspects": result["whitebox"]["masking_suspects"]}
    for name, c in result["attacks"].items():
        line[name] = {"success": [c["plain"]["success_rate"], c["mcg"]["success_rate"]],
                      "mean_q": [c["plain"]["mean_queries"], c["mcg"]["mean_queries"]],
                      "mcg_fasr": c["mcg"]["fasr"], "query_ratio": c["query_ratio"]}
    line["seconds"] = result["seconds"]["total"]
    print(json.dumps(line))
    return result


def evidence(args: argparse.Namespace, summary: dict[str, Any], generator: dict[str, Any],
             seconds: dict[str, float], total: float) -> dict[str, Any]:
    """The committed summary: per attack the plain and seeded statistics and the query ratios."""
    def stats(r: dict[str, Any]) -> dict[str, Any]:
        keys = ("success_rate", "mean_queries", "median_queries", "fasr", "mean_queries_all", "attacked")
        return {k: r[k] for k in keys}

    attacks = {}
    for name, c in summary["mcg"]["comparison"].items():
        attacks[name] = {"plain": stats(summary["attacks"][name]), "mcg": stats(summary["attacks"][f"mcg+{name}"]),
                         "query_ratio": c["query_ratio"], "query_ratio_all": c["query_ratio_all"]}
    return {"dataset": args.dataset, "tiny": args.tiny, "settings": settings_of(args),
            "target": target_of(args, summary),
            "threat": {"norm": summary["norm"], "eps": summary["eps"], "budget": summary["budget"],
                       "output": summary["output"], "levels": summary["levels"]},
            "points": summary["points"], "clean_acc": summary["clean_acc"], "attacks": attacks,
            "whitebox": {k: summary["whitebox"][k] for k in ("attack", "success_rate", "passed", "masking_suspects")},
            "generator": {k: generator[k] for k in ("images", "pairs", "stage1_nll", "stage2_margin", "episodes")
                          if k in generator},
            "query_ratio": "mcg mean queries over successes / plain (below 1: fewer); _all: over every attacked point",
            "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(total, 1)},
            "threads": torch.get_num_threads()}


def target_of(args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """What was attacked: the target's kind and recipe, the models (their overrides); few-shot
    also the episode shape, how many frozen test episodes were attacked and that the surrogates
    were adapted to each one's support set."""
    spec = DATASETS[args.dataset]
    out = {"kind": spec["kind"], "recipe": summary.get("recipe"), "config": learner_spec(args)["config"],
           "models": {name: " ".join(extra) for name, extra in learner_spec(args)["models"].items()}}
    if spec["kind"] == "fewshot":
        scale = ({"epochs": args.epochs} if args.learner == "rfs"
                 else {"substrate": " ".join(SUBSTRATE), "iterations": args.iterations})
        out.update({**FEWSHOT, "learner": args.learner, "queries": args.queries, "episodes_attacked": summary["groups"],
                    **scale, "adapted_per_episode": summary["mcg"]["adapted_per_episode"]})
    return out


if __name__ == "__main__":
    main()
