"""Every benchmark of metarobust, side by side with its peers, in one run.

    python scripts/bench.py                      # CPU, every section at the issue's sizes
    python scripts/bench.py --quick              # smaller sizes: a few minutes on a 2-core CPU
    python scripts/bench.py --device cuda --amp bf16 --channels-last   # a GPU (vmap is measured too)
    python scripts/bench.py --sections pgd,at --write-table            # refresh compilation.MEASURED

Sections (``--sections``, all by default), each timed with its variants interleaved
(A B C A B C ...) after a warm-up, medians reported, peak memory per variant (CUDA: the
allocator's peak; CPU: the peak resident-set growth during the call, sampled every 2 ms):

- ``pgd``: PGD-10 (L-inf 8/255, step 2/255, random start) on PreAct-ResNet-18 at 1/4 width
  (``--width 16``) on 3x32x32 inputs, eval mode, batch 128 (``--quick``: 32): ours eager
  (``compile=False``), ours compiled (``PGD(compile=True)``), ``torchattacks.PGD``, and the floor
  (10 bare forward+backward passes). Robust accuracy of eager and compiled on the same noise.
- ``at``: one PGD-AT training step (PGD-10 in train-mode BN, SGD update) of the same model:
  the engine (``Trainer``, recipe ``pgd_at``) with ``at.compile=off`` and ``on``, against the
  hand-written eager loop (Rice et al.'s ``attack_pgd`` shape).
- ``cascade``: APGD-CE then APGD-T (9 targets) on the points still robust, ours (the harness's
  survivor cascade) against pyautoattack's (``import pyautoattack``) ``apgd-ce`` + ``apgd-t`` (``version="custom"``, same
  steps, restarts and targets) on 500 points (``--quick``: 32 points, 25 steps, 3 targets).
- ``maml``: a second-order meta-step (Conv-4, 5-way 1-shot, 15 queries, meta-batch 16,
  ``--quick``: 4) with Adam, per recipe (``--maml-recipes``: ``maml`` and the robust
  ``adversarial_querying``, ``r_maml``, ``adml``; ``--quick``: ``maml``): ours (``loop``, and
  ``vmap``) against ``higher``'s per-task loop (and ``learn2learn`` for ``maml`` where it imports).
- ``fewshot``: the harness on frozen few-shot episodes (Conv-4 with task batch norm, PGD-10,
  the masking checks on), ``meta.execution`` loop against vmap; seconds per episode.
- ``sampling``: drawing one meta-batch of episodes, as a fraction of the ``maml`` meta-step.

Prints a table per section and ends with one JSON line: ``speedup_vs_torchattacks_pgd10``,
``speedup_vs_plain_at_step``, ``speedup_vs_pyautoattack_cascade``, ``speedup_vs_higher_maml``
(the peer's time over ours: > 1, we are faster), and the other figures, with the machine and its
load. ``--write-table`` writes the ``pgd``/``at`` measurement into
``metarobust/compilation.py``'s ``MEASURED`` (what ``at.compile=auto`` decides from).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable

if "--warm-cache" not in sys.argv:  # a private inductor cache: the first call pays a cold compile
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

SECTIONS = ("pgd", "at", "cascade", "maml", "fewshot", "sampling")


# -- measuring ---------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


@contextlib.contextmanager
def peak_memory(device: torch.device, out: list[float]):
    """Append the call's peak memory in MB to ``out``: CUDA, the allocator's peak; CPU, the peak
    growth of the resident set over its value at the start (a 2 ms sampling thread)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out.append(torch.cuda.max_memory_allocated(device) / 2**20)
        return
    start, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.append(max(peak[0], _rss_mb()) - start)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
                     ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """``(times, first_call_s, peak_mb)``: every variant ``warmup`` times (the first call timed:
    compilation), then ``repeats`` interleaved rounds."""
    first, memory = {}, {k: [] for k in fns}
    for i in range(warmup):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i == 0:
                first[name] = time.perf_counter() - t0
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            with peak_memory(device, memory[name]):
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
    for name in fns:  # no warm-up: the first timed call is the first call
        first.setdefault(name, times[name][0] if times[name] else float("nan"))
    return times, first, {k: max(v) if v else float("nan") for k, v in memory.items()}


def load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def table(title: str, times: dict[str, list[float]], peak: dict[str, float], reference: str | None = None,
          first: dict[str, float] | None = None, unit: str = "s") -> dict[str, float]:
    """Print one section's table; returns the medians."""
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n== {title} (load {load()}) ==")
    ref = f"{'  vs ' + reference:>16}" if reference else ""
    print(f"{'variant':<28}{'median ' + unit:>11}{'min ' + unit:>9}{ref}{'peak MB':>10}{'1st call s':>12}")
    for k, v in times.items():
        ratio = f"{med[reference] / med[k]:>15.2f}x" if reference else ""
        fc = f"{first[k]:>12.2f}" if first and k in first else ""
        print(f"{k:<28}{med[k]:>11.4f}{min(v):>9.4f}{ratio}{peak.get(k, float('nan')):>10.0f}{fc}")
    return med


# -- workloads ---------------------------------------------------------------------------------
_EVAL_MODEL: list = []


def eval_resnet(args) -> torch.nn.Module:
    """One eval-mode model for the attack sections (their compiled forward is shared), untrained
    but with BatchNorm statistics of the inputs (else its logits barely depend on the input)."""
    if not _EVAL_MODEL:
        model = resnet(args).train()
        with torch.no_grad():  # running statistics of the inputs: an untrained model whose logits vary
            for seed in range(3):
                model(images(args, 64, seed=10 + seed))
        _EVAL_MODEL.append(model.eval().requires_grad_(False))
    return _EVAL_MODEL[0]


def resnet(args, classes: int = 10) -> torch.nn.Module:
    from metarobust.models.preact_resnet import preact_resnet18

    torch.manual_seed(0)
    model = preact_resnet18(3, classes, args.width).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(args):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def images(args, count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=args.device).manual_seed(seed)
    x = torch.rand(count, 3, 32, 32, generator=g, device=args.device)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def bench_pgd(args, out: dict) -> None:
    import torchattacks

    from metarobust.attacks.pgd import PGD

    device = torch.device(args.device)
    model = eval_resnet(args)
    x = images(args, args.batch)
    with torch.no_grad(), autocast(args):
        y = model(x).argmax(dim=1)
    eps, alpha = 8 / 255, 2 / 255

    def forward(v):
        with autocast(args):
            return model(v)

    # The bare module for the compiled variant (compile=True compiles nn.Modules, once).
    eager, compiled = PGD("linf", eps, alpha, 10, compile=False), PGD("linf", eps, alpha, 10, compile=True)
    noise = eager.init_noise(x, torch.Generator(device=device).manual_seed(1))
    compiled_model = model if args.amp == "none" else _Autocast(model, args).eval()
    # eval(): torchattacks restores the wrapper's mode after each call, and a train-mode wrapper
    # would put the model's BatchNorm in train mode for every variant after it.
    ta = torchattacks.PGD(_Autocast(model, args).eval(), eps=eps, alpha=alpha, steps=10, random_start=True)

    def floor():
        v = x.detach().requires_grad_(True)
        for _ in range(10):
            (g,) = torch.autograd.grad(F.cross_entropy(forward(v).float(), y, reduction="sum"), v)
        return g

    fns = {"floor (10 fwd+bwd)": floor,
           "ours eager": lambda: eager(forward, x, y, noise=noise, check=False),
           "torchattacks": lambda: ta(x, y)}
    if args.compile != "off":
        fns["ours compiled"] = lambda: compiled(compiled_model, x, y, noise=noise, check=False)
    times, first, peak = time_interleaved(fns, device, args.warmup, args.repeats)
    med = table(f"PGD-10, PreAct-ResNet-18 width {args.width}, batch {args.batch}", times, peak, "torchattacks", first)
    ours = "ours compiled" if "ours compiled" in med else "ours eager"
    out["speedup_vs_torchattacks_pgd10"] = round(med["torchattacks"] / med[ours], 3)
    out["speedup_vs_torchattacks_pgd10_eager"] = round(med["torchattacks"] / med["ours eager"], 3)
    out["pgd10_overhead_vs_floor_eager"] = round(med["ours eager"] / med["floor (10 fwd+bwd)"] - 1, 3)
    with torch.no_grad():
        a = eager(forward, x, y, noise=noise)
        acc = {"eager": float((forward(a).argmax(1) == y).float().mean())}
        if "ours compiled" in med:
            b = compiled(compiled_model, x, y, noise=noise)
            acc["compiled"] = float((forward(b).argmax(1) == y).float().mean())
            out["pgd10_compiled_over_eager"] = round(med["ours eager"] / med["ours compiled"], 3)
            out["pgd10_compile_s"] = round(first["ours compiled"] - med["ours compiled"], 1)
            out["pgd10_compiled_max_abs_diff"] = float(f"{float((a - b).abs().max()):.3g}")
            out["pgd10_compiled_frac_pixels_differing"] = float(f"{float((a != b).float().mean()):.3g}")
    print(f"robust accuracy on the same noise: {acc}")
    out["pgd10_robust_acc"] = acc
    out["pgd10_peak_mb"] = {k: round(v, 1) for k, v in peak.items()}


class _Autocast(torch.nn.Module):
    """A module running ``model`` under the benchmark's autocast (torchattacks takes a module)."""

    def __init__(self, model, args):
        super().__init__()
        self.model, self.args = model, args

    def forward(self, v):
        with autocast(self.args):
            return self.model(v)


def bench_at(args, out: dict) -> None:
    from metarobust.data.store import ImageStore
    from metarobust.experiment import load_config
    from metarobust.training.data import TrainingData
    from metarobust.training.engine import Trainer

    device = torch.device(args.device)
    count = args.batch * 4
    g = torch.Generator().manual_seed(0)
    store = ImageStore((torch.rand(count, 3, 32, 32, generator=g) * 255).to(torch.uint8),
                       torch.arange(count) % 10, [str(i) for i in range(10)]).to(device)
    data = TrainingData(store, None, None)
    eps, alpha = 8 / 255, 2 / 255
    base = ["recipe=pgd_at", "data.dataset=cifar10", "model.name=preact_resnet18", f"model.hidden={args.width}",
            f"device={args.device}", f"at.batch_size={args.batch}", "at.epochs=1000", "optim.schedule=constant",
            "optim.lr=0.01", "at.augment=none", f"at.amp={args.amp}", f"at.channels_last={args.channels_last}",
            "train.log_every=1000000", "train.checkpoint_every=1000000", "train_attack.name=pgd",
            f"train_attack.eps={eps}", "train_attack.steps=10", f"train_attack.step_size={alpha}",
            "train_attack.random_start=true", "at.attack_bn=train"]
    trainers = {"ours eager": Trainer(load_config(None, [*base, "at.compile=off"]), data=data, progress=False)}
    if args.compile != "off":
        trainers["ours compiled"] = Trainer(load_config(None, [*base, "at.compile=on"]), data=data, progress=False)

    model = resnet(args).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    state = {"i": 0}

    def plain_step():  # the hand-written loop: gather, PGD-10 in train mode, update
        i = state["i"] = (state["i"] + 1) % 4
        x = store.images[i * args.batch:(i + 1) * args.batch].float().div_(255)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = store.labels[i * args.batch:(i + 1) * args.batch]
        delta = (torch.rand(x.shape, generator=gen, device=device) * 2 - 1) * eps
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(10):
            with autocast(args):
                loss = F.cross_entropy(model(x + delta).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        with autocast(args):
            loss = F.cross_entropy(model((x + delta).detach()).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns = {"hand-written eager loop": plain_step, **{k: t.train_step for k, t in trainers.items()}}
    times, first, peak = time_interleaved(fns, device, args.warmup, args.repeats)
    med = table(f"PGD-AT step, PreAct-ResNet-18 width {args.width}, batch {args.batch}", times, peak,
                "hand-written eager loop", first)
    ours = "ours compiled" if "ours compiled" in med else "ours eager"
    out["speedup_vs_plain_at_step"] = round(med["hand-written eager loop"] / med[ours], 3)
    out["speedup_vs_plain_at_step_eager"] = round(med["hand-written eager loop"] / med["ours eager"], 3)
    out["at_step_s"] = {k: round(v, 4) for k, v in med.items()}
    out["at_peak_mb"] = {k: round(v, 1) for k, v in peak.items()}
    if "ours compiled" in med:
        out["at_compiled_over_eager"] = round(med["ours eager"] / med["ours compiled"], 3)
        out["at_compile_s"] = round(first["ours compiled"] - med["ours compiled"], 1)


def bench_cascade(args, out: dict) -> None:
    from pyautoattack import AutoAttack

    from metarobust.attacks.apgd import APGD
    from metarobust.evaluation.harness import Unit, cascade

    device = torch.device(args.device)
    model = eval_resnet(args)
    points, steps, targets = (32, 25, 3) if args.quick else (args.cascade_points, 100, 9)
    x = images(args, points, seed=2)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # every point starts correct
    eps = args.cascade_eps
    forward = model
    if args.compile == "on":
        from metarobust.compilation import compiled_forward

        forward = compiled_forward(model)
    attacks = [("apgd-ce", APGD("linf", eps, steps, 1, "ce")), ("apgd-t", APGD("linf", eps, steps, 1, "dlr", True, targets))]
    unit = Unit(lambda params, v: forward(v), x.unsqueeze(0), y.unsqueeze(0), y.unsqueeze(0))
    result = {}

    def ours():
        with torch.no_grad():
            _, robust, _ = cascade(unit, attacks, torch.Generator(device=device).manual_seed(0))
        result["ours"] = float(robust.float().mean())

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"],
                           device=args.device, seed=0)
    adversary.apgd.n_iter, adversary.apgd.n_restarts = steps, 1
    adversary.apgd_targeted.n_iter, adversary.apgd_targeted.n_restarts = steps, 1
    adversary.apgd_targeted.n_target_classes = targets

    def peer():
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=points)[0]
        with torch.no_grad():
            result["pyautoattack"] = float((model(x_adv).argmax(1) == y).float().mean())

    times, first, peak = time_interleaved({"ours": ours, "pyautoattack": peer}, device, args.cascade_warmup,
                                           max(1, args.repeats // 2))
    med = table(f"APGD-CE + APGD-T ({steps} steps, {targets} targets), {points} points, eps {eps:.4f}", times, peak,
                "pyautoattack", first)
    print(f"robust accuracy: {result}")
    out["speedup_vs_pyautoattack_cascade"] = round(med["pyautoattack"] / med["ours"], 3)
    out["cascade_robust_acc"] = result
    out["cascade_peak_mb"] = {k: round(v, 1) for k, v in peak.items()}


def bench_maml(args, out: dict) -> None:
    import bench_maml as bm  # scripts/bench_maml.py: the workload, and higher's version of each recipe

    from metarobust.attacks import build_attack
    from metarobust.meta.execution import meta_backward
    from metarobust.meta.functional import params_of
    from metarobust.training.recipes import build_recipe

    device = torch.device(args.device)
    margs = argparse.Namespace(device=args.device, ways=5, shots=1, queries=15, meta_batch=4 if args.quick else 16,
                               hidden=64, inner_steps=1, inner_lr=0.4, first_order=False)
    default = "ours vmap" if device.type == "cuda" else "ours loop"  # meta.execution=auto
    speedups, meta_step = {}, None
    for name in args.maml_recipes:
        _, _, sampler, model = bm.make_workload(margs)
        cfg = bm.bench_config(margs, name)
        recipe, attack = build_recipe(cfg), build_attack(cfg.train_attack)
        gen = torch.Generator(device=device).manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        task_fn, params = recipe.task(recipe.learner(model), attack), params_of(model)
        batch = sampler.sample()

        def step(run, optimizer=optimizer, batch=batch):
            def go():
                optimizer.zero_grad(set_to_none=True)
                run(batch)
                optimizer.step()
            return go

        def ours(execution, recipe=recipe, task_fn=task_fn, params=params, gen=gen):
            return lambda b: meta_backward(task_fn, params, b, recipe.draw_noise(b, gen), execution)

        fns = {"ours loop": step(ours("loop")), "ours vmap": step(ours("vmap")),
               "higher": step(bm.higher_step(name, model, cfg, attack, lambda b, r=recipe, g=gen: r.draw_noise(b, g)))}
        if name == "maml" and bm.available("learn2learn"):
            import learn2learn as l2l

            l2l_maml = l2l.algorithms.MAML(model, lr=margs.inner_lr, first_order=False)

            def l2l_step(b, l2l_maml=l2l_maml):
                for t in range(b.num_tasks):
                    learner = l2l_maml.clone()
                    learner.adapt(F.cross_entropy(learner(b.support_x[t]), b.support_y[t]))
                    (F.cross_entropy(learner(b.query_x[t]), b.query_y[t]) / b.num_tasks).backward()

            fns["learn2learn"] = step(l2l_step)
        times, first, peak = time_interleaved(fns, device, args.warmup, args.repeats)
        med = table(f"{name} second-order meta-step, Conv-4, 5-way 1-shot, meta-batch {margs.meta_batch}", times,
                    peak, "higher", first)
        speedups[name] = round(med["higher"] / med[default], 3)
        out.setdefault("meta_step_s", {})[name] = {k: round(v, 4) for k, v in med.items()}
        out.setdefault("meta_peak_mb", {})[name] = {k: round(v, 1) for k, v in peak.items()}
        out.setdefault("meta_vmap_over_loop", {})[name] = round(med["ours loop"] / med["ours vmap"], 3)
        if name == "maml":
            meta_step = med[default]
    if "maml" in speedups:
        out["speedup_vs_higher_maml"] = speedups["maml"]
    out["speedup_vs_higher"] = speedups
    out["maml_compile"] = "not measured: meta recipes run eager (torch.func functional calls per task)"

    # Episode sampling as a fraction of the meta-step (same sampler, same meta-batch).
    if "sampling" in args.sections and meta_step is not None:
        times, _, _ = time_interleaved({"sample": sampler.sample}, device, 2, max(20, args.repeats))
        sample = statistics.median(times["sample"])
        print(f"\n== episode sampling ==\none meta-batch of {margs.meta_batch} episodes: {sample * 1000:.2f} ms, "
              f"{100 * sample / meta_step:.2f}% of the meta-step ({default})")
        out["sampling_ms"] = round(sample * 1000, 3)
        out["sampling_fraction_of_meta_step"] = round(sample / meta_step, 5)


def bench_fewshot(args, out: dict) -> None:
    import bench_maml as bm

    from metarobust.config import ExperimentConfig
    from metarobust.data.manifest import freeze_episodes
    from metarobust.evaluation.fewshot import fewshot_units
    from metarobust.evaluation.harness import evaluate_units
    from metarobust.training.recipes import build_recipe

    device = torch.device(args.device)
    episodes = 4 if args.quick else 40
    margs = argparse.Namespace(device=args.device, ways=5, shots=1, queries=15, meta_batch=1, hidden=32,
                               inner_steps=1, inner_lr=0.4, first_order=False)
    _, _, sampler, model = bm.make_workload(margs)
    store = sampler.store
    manifest = freeze_episodes(store, 5, 1, 15, episodes, seed=0)
    results = {}

    def run(execution):
        def go():
            cfg = ExperimentConfig(recipe="maml")
            cfg.meta.execution, cfg.eval.batch_size = execution, 4 if args.quick else 20
            cfg.eval.check_points = 30 if args.quick else 150
            recipe = build_recipe(cfg)
            learner = recipe.evaluation_learner(model, 5)
            units = fewshot_units(model, store, manifest, cfg, learner)
            results[execution] = evaluate_units(units, cfg, 5, store.class_names, interval="episodes").robust_acc
        return go

    times, first, peak = time_interleaved({"loop": run("loop"), "vmap": run("vmap")}, device, 1,
                                          max(1, args.repeats // 2))
    med = table(f"few-shot evaluation, {episodes} episodes (PGD-10 + masking checks), Conv-4 width 32", times,
                peak, "loop", first)
    out["fewshot_s_per_episode"] = {k: round(v / episodes, 4) for k, v in med.items()}
    out["fewshot_vmap_over_loop"] = round(med["loop"] / med["vmap"], 3)
    out["fewshot_robust_acc"] = results


# -- the measurement table -----------------------------------------------------------------------
def write_table(args, out: dict) -> None:
    """Write the ``pgd``/``at`` figures into ``metarobust.compilation.MEASURED``."""
    needed = ("at_compiled_over_eager", "pgd10_compiled_over_eager", "at_compile_s")
    if not all(k in out for k in needed):
        print("--write-table needs the pgd and at sections with compilation on; table unchanged")
        return
    path = os.path.join(HERE, "..", "metarobust", "compilation.py")
    text = open(path).read()
    kind = torch.device(args.device).type
    rows = {k: v for k, v in re.findall(r'    (\("\w+", "\w+"\)): (Measurement\(.*\)),\n',
                                          text.split("# BEGIN MEASURED")[1].split("# END MEASURED")[0])}
    source = (f"scripts/bench.py{' --quick' if args.quick else ''} {time.strftime('%Y-%m-%d')}, {out['machine']}, "
              f"{args.threads} threads, load {out['load_avg_1m']}, torch {torch.__version__}, width {args.width}, "
              f"batch {args.batch}, amp {args.amp}")
    rows[f'("{kind}", "preact_resnet18")'] = (
        f"Measurement(train_speedup={out['at_compiled_over_eager']}, attack_speedup={out['pgd10_compiled_over_eager']}, "
        f"compile_s={max(out['at_compile_s'], 0.0)}, eager_step_s={out['at_step_s']['ours eager']}, source={source!r})")
    body = "".join(f"    {k}: {v},\n" for k, v in sorted(rows.items()))
    head, rest = text.split("MEASURED: dict[tuple[str, str], Measurement] = {\n", 1)
    _, tail = rest.split("}\n# END MEASURED", 1)
    open(path, "w").write(f"{head}MEASURED: dict[tuple[str, str], Measurement] = {{\n{body}}}\n# END MEASURED{tail}")
    print(f"wrote ({kind!r}, 'preact_resnet18') into {os.path.normpath(path)}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes on a 2-core CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from " + ", ".join(SECTIONS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--width", type=int, default=16, help="PreAct-ResNet-18 width (64: full; 16: 1/4)")
    p.add_argument("--batch", type=int, default=None, help="PGD and AT batch (default 128; --quick 32)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="also time the compiled variants (off: eager only)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast for ours and the peers")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--maml-recipes", default=None,
                   help="meta recipes timed against higher (default: maml with --quick, else maml,"
                        "adversarial_querying,r_maml,adml)")
    p.add_argument("--cascade-points", type=int, default=500)
    p.add_argument("--cascade-eps", type=float, default=1 / 255,
                   help="the cascade's L-inf eps (an untrained model: 8/255 breaks every point in a step)")
    p.add_argument("--cascade-warmup", type=int, default=1,
                   help="untimed cascade rounds first (0: the one timed round includes our compilation)")
    p.add_argument("--write-table", action="store_true", help="write the compile measurement into compilation.py")
    p.add_argument("--warm-cache", action="store_true",
                   help="use torch's on-disk compile cache (default: a fresh one, so '1st call' is a cold compile)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.batch = args.batch or (32 if args.quick else 128)
    recipes = args.maml_recipes or ("maml" if args.quick else "maml,adversarial_querying,r_maml,adml")
    args.maml_recipes = [r for r in recipes.split(",") if r]
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    out: dict = {}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"metarobust bench: {machine}, torch {torch.__version__}, {args.threads} threads, load {load()}, "
          f"sections {','.join(args.sections)}, quick {args.quick}, amp {args.amp}, channels_last {args.channels_last}")
    for name, fn in (("pgd", bench_pgd), ("at", bench_at), ("cascade", bench_cascade), ("maml", bench_maml),
                     ("fewshot", bench_fewshot)):
        if name in args.sections or (name == "maml" and "sampling" in args.sections):
            try:
                fn(args, out)
            except ImportError as exc:  # a peer that does not install here: say so, run the rest
                print(f"\n== {name}: skipped ({exc}) ==")
                out[f"{name}_skipped"] = str(exc)
    out.update({"device": str(device), "machine": machine, "threads": args.threads, "torch": torch.__version__,
                "python": platform.python_version(), "quick": args.quick, "width": args.width, "batch": args.batch,
                "amp": args.amp, "channels_last": args.channels_last, "load_avg_1m": load(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if args.write_table:
        write_table(args, out)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
