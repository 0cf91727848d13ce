"""Time one meta-step of each recipe: metarobust (loop and vmap executions) against peers doing
identical work, in one run.

Same model (Conv-4, 64 filters), same tasks (5-way 1-shot, 15 queries per class, 28x28
single-channel, meta-batch 16), same inner loop (SGD, second order unless --first-order).
Recipes (``--recipes``): ``maml``, and the robust ones with the attack inside each task:
``adversarial_querying`` (FGSM-RS on the query through the fast weights), ``r_maml`` (TRADES-KL
of an FGSM-RS query attack in the meta-update), ``adml`` (a second inner trajectory on the
support re-attacked at every step, crossed query losses). The training attack is the default
``train_attack`` (FGSM-RS, eps 8/255, step 10/255) and its random starts come from the same
seeded generator (``MetaRecipe.draw_noise``) in every variant.

Peers: a per-task loop with ``higher`` (Grefenstette et al.) for every recipe, running the same
attack code on the same noise against its functional model's detached fast weights; for
``maml`` also a plain per-task loop (``functional_call`` + ``torch.autograd.grad(create_graph=True)``)
and ``learn2learn`` (Arnold et al.) where it imports. Each variant also saves the meta-gradient of
its first batch; the table reports its largest difference from ``higher``'s (relative to the
largest gradient entry): the work is identical, so it is float32 round-off.

Each variant runs in its own process so its peak memory (max RSS) is its own; with ``--rounds N``
the variants run N times interleaved and the fastest round of each counts (on a shared machine
a neighbour's burst then slows one round, not the comparison). Prints a table per
recipe, the ratios, and ends with one JSON line (per recipe: ``speedup_vs_higher`` = higher's
time over our default execution's, ``vmap_over_loop``, ``grad_rel_diff_vs_higher``...).

    python scripts/bench_maml.py                              # CPU, every recipe
    python scripts/bench_maml.py --recipes r_maml,adml --meta-batch 4
    python scripts/bench_maml.py --device cuda                # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

VARIANTS = ["metarobust_loop", "metarobust_vmap", "plain_loop", "higher", "learn2learn"]
RECIPES = ["maml", "adversarial_querying", "r_maml", "adml"]
MAML_ONLY_PEERS = {"plain_loop", "learn2learn"}


def make_workload(args):
    import torch

    from metarobust.config import ModelConfig
    from metarobust.data.sampler import EpisodicSampler
    from metarobust.data.store import ImageStore
    from metarobust.models import build_model

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    classes, per_class = 64, 20
    images = (torch.rand(classes * per_class, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    store = ImageStore(images, torch.arange(classes).repeat_interleave(per_class),
                       [str(i) for i in range(classes)]).to(device)
    sampler = EpisodicSampler(store, args.ways, args.shots, args.queries, args.meta_batch, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=args.hidden), 1, args.ways, 28).to(device)
    return torch, device, sampler, model


def bench_config(args, recipe: str):
    """The recipe's config with the benchmark's inner loop; every other field is the default
    (training attack FGSM-RS at 8/255, R-MAML's TRADES weight 5, placement out)."""
    from metarobust.experiment import load_config

    return load_config(None, [f"recipe={recipe}", f"meta.inner_lr={args.inner_lr}", f"meta.inner_steps={args.inner_steps}",
                              f"meta.first_order={args.first_order}"])  # every section, the recipes' too


def higher_step(recipe: str, model, cfg, attack, draw):
    """One meta-step of ``recipe`` written per task with ``higher``: the same losses, the same
    attack function and noise, the attack run on the functional model's detached fast weights."""
    import higher
    import torch
    import torch.nn.functional as F

    from metarobust.attacks import cross_entropy_sum, kl_from_clean
    from metarobust.attacks.losses import kl_divergence
    from metarobust.training.objectives import accuracy

    lr, steps, track = cfg.meta.inner_lr, cfg.meta.inner_steps, not cfg.meta.first_order
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    weight = cfg.robust.weight

    def frozen(fmodel):
        # fmodel(x, params=...) makes `params` its fast weights (higher's update_params): put the
        # live, differentiable ones back after each attack forward.
        live = list(fmodel.fast_params)
        params = [p.detach() for p in live]

        def forward(x):
            logits = fmodel(x, params=params)
            fmodel.update_params(live)
            return logits

        return forward

    def ctx():
        return higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=track)

    def step(batch):
        noise = draw(batch)
        stats = []
        for t in range(batch.num_tasks):
            sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
            q_noise = None if noise is None else noise["query"][t]
            with ctx() as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(sx), sy))
                # The same training statistics as the recipes log (AQ and ADML: one extra no-grad
                # forward of the clean query), so that the work is identical.
                if recipe == "maml":
                    logits = fmodel(qx)
                    loss = F.cross_entropy(logits, qy)
                    stats.append(accuracy(logits.detach(), qy))
                elif recipe == "adversarial_querying":
                    x_adv = attack(frozen(fmodel), qx, qy, cross_entropy_sum, q_noise)
                    adv = fmodel(x_adv)
                    loss = F.cross_entropy(adv, qy)
                    with torch.no_grad():
                        stats += [accuracy(frozen(fmodel)(qx), qy), accuracy(adv.detach(), qy)]
                elif recipe == "r_maml":
                    clean = fmodel(qx)
                    target = F.log_softmax(clean.detach(), dim=-1)
                    x_adv = attack(frozen(fmodel), qx, target, kl_from_clean, q_noise)
                    adv = fmodel(x_adv)
                    reg = kl_divergence(F.log_softmax(clean, dim=-1), F.log_softmax(adv, dim=-1)).mean()
                    loss = F.cross_entropy(clean, qy) + weight * reg
                    stats += [accuracy(clean.detach(), qy), accuracy(adv.detach(), qy), reg.detach()]
                elif recipe == "adml":
                    with ctx() as (amodel, adiffopt):
                        for s in range(steps):
                            s_adv = attack(frozen(amodel), sx, sy, cross_entropy_sum, noise["support_steps"][t][s])
                            adiffopt.step(F.cross_entropy(amodel(s_adv), sy))
                        x_adv = attack(frozen(fmodel), qx, qy, cross_entropy_sum, q_noise)
                        adv, cross = fmodel(x_adv), amodel(qx)
                        loss = 0.5 * (F.cross_entropy(cross, qy) + F.cross_entropy(adv, qy))
                        with torch.no_grad():
                            stats += [accuracy(frozen(fmodel)(qx), qy), accuracy(adv.detach(), qy),
                                      accuracy(cross.detach(), qy)]
                        (loss / batch.num_tasks).backward()
                    continue
                else:
                    raise ValueError(f"no higher version of recipe {recipe!r}")
                (loss / batch.num_tasks).backward()

    return step


def run_variant(name: str, args) -> dict:
    torch, device, sampler, model = make_workload(args)
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    lr, steps, first_order = args.inner_lr, args.inner_steps, args.first_order
    recipe = args.child_recipe
    cfg = bench_config(args, recipe)
    from metarobust.attacks import build_attack
    from metarobust.training.recipes import build_recipe

    attack = build_attack(cfg.train_attack)
    gen = torch.Generator(device=device).manual_seed(1)
    meta_recipe = build_recipe(cfg)

    def draw(batch):
        return meta_recipe.draw_noise(batch, gen)

    if name.startswith("metarobust"):
        from metarobust.meta.execution import meta_backward
        from metarobust.meta.functional import params_of
        execution = name.split("_")[1]
        task_fn = meta_recipe.task(meta_recipe.learner(model), attack)
        params = params_of(model)

        def step(batch):
            meta_backward(task_fn, params, batch, draw(batch), execution)

    elif name == "higher":
        step = higher_step(recipe, model, cfg, attack, draw)

    elif name == "plain_loop":
        from torch.func import functional_call

        names = [n for n, _ in model.named_parameters()]

        def step(batch):
            for t in range(batch.num_tasks):
                fast = dict(model.named_parameters())
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                    fast = {n: fast[n] - lr * g for n, g in zip(names, grads)}
                q = F.cross_entropy(functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t])
                (q / batch.num_tasks).backward()

    elif name == "learn2learn":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)

        def step(batch):
            for t in range(batch.num_tasks):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
                q = F.cross_entropy(learner(batch.query_x[t]), batch.query_y[t])
                (q / batch.num_tasks).backward()
    else:
        raise ValueError(name)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = [sampler.sample() for _ in range(args.warmup + args.repeats)]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step(batch)
        if i == 0 and args.grad_out:  # the first (warm-up) batch's meta-gradient, for the cross-check
            torch.save([p.grad.detach().cpu().clone() for p in model.parameters()], args.grad_out)
        optimizer.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    result = {"variant": name, "recipe": recipe, "seconds": times[len(times) // 2],
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def available(name: str) -> bool:
    module = {"higher": "higher", "learn2learn": "learn2learn"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except Exception:
        return False


def run_child(name: str, recipe: str, args, grad_out: str) -> dict | str:
    """One variant in its own process; its result dict, or the error line."""
    argv = [a for a in sys.argv[1:]]
    out = subprocess.run([sys.executable, __file__, *argv, "--child", name, "--child-recipe", recipe,
                          "--grad-out", grad_out], capture_output=True, text=True)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def relative_gap(a: list, b: list) -> float:
    """max |a - b| over every gradient entry, relative to max |b|."""
    top = max(float(t.abs().max()) for t in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(top, 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from " + ", ".join(RECIPES))
    parser.add_argument("--recipe", default=None, help="one recipe (same as --recipes RECIPE)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of every variant; the fastest round of each is reported")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-recipe", default="maml", help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return

    import torch

    recipes = [args.recipe] if args.recipe else [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: {unknown} have no peer version here; choose from {RECIPES}")
    default = "vmap" if args.device.startswith("cuda") else "loop"
    headline = {"device": args.device, "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": args.threads, "meta_batch": args.meta_batch, "rounds": args.rounds,
                "inner_steps": args.inner_steps, "second_order": not args.first_order,
                "default_execution": default, "recipes": {}}
    tmp = tempfile.mkdtemp(prefix="bench_maml_")
    for recipe in recipes:
        print(f"== {recipe} ==", flush=True)
        variants = [v for v in args.variants.split(",") if v and (recipe == "maml" or v not in MAML_ONLY_PEERS)]
        results, grads = {}, {}
        for name in [v for v in variants if not available(v)]:
            print(f"{name:<18} skipped (not importable here)")
        variants = [v for v in variants if available(v)]
        for round_ in range(args.rounds):  # interleaved rounds; the fastest round counts (shared machines)
            for name in variants:
                grad_out = os.path.join(tmp, f"{recipe}_{name}.pt")
                r = run_child(name, recipe, args, grad_out)
                if isinstance(r, str):
                    print(f"{name:<18} failed: {r}")
                    continue
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
                grads[name] = torch.load(grad_out, weights_only=True)
                extra = f"  peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
                label = f"{name} (round {round_ + 1})" if args.rounds > 1 else name
                print(f"{label:<28} {r['seconds'] * 1000:9.1f} ms/meta-step   max RSS {r['max_rss_mb']:7.0f} MB"
                      f"{extra}", flush=True)
        ours = {k: v for k, v in results.items() if k.startswith("metarobust")}
        if not ours:
            continue
        best = ours.get(f"metarobust_{default}") or min(ours.values(), key=lambda r: r["seconds"])
        line = {"ms_per_step": {k: round(v["seconds"] * 1000, 1) for k, v in results.items()}}
        for peer in ("plain_loop", "higher", "learn2learn"):
            if peer in results:
                ratio = results[peer]["seconds"] / best["seconds"]
                key = "loop" if peer == "plain_loop" else peer
                line[f"speedup_vs_{key}"] = round(ratio, 3)
                line[f"memory_ratio_vs_{key}"] = round(best["max_rss_mb"] / results[peer]["max_rss_mb"], 3)
                print(f"ours ({default}) vs {peer}: {ratio:.2f}x speed, "
                      f"{best['max_rss_mb'] / results[peer]['max_rss_mb']:.2f}x memory")
        if "metarobust_vmap" in ours and "metarobust_loop" in ours:
            line["vmap_over_loop"] = round(ours["metarobust_loop"]["seconds"] / ours["metarobust_vmap"]["seconds"], 3)
        if "higher" in grads:
            for name in ("metarobust_loop", "metarobust_vmap"):
                if name in grads:
                    gap = relative_gap(grads[name], grads["higher"])
                    line[f"grad_rel_diff_{name.split('_')[1]}_vs_higher"] = float(f"{gap:.2e}")
                    print(f"{name} meta-gradient vs higher: max relative difference {gap:.1e}")
        headline["recipes"][recipe] = line
    for key in ("speedup_vs_higher", "vmap_over_loop"):
        headline[key] = {r: v[key] for r, v in headline["recipes"].items() if key in v}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
