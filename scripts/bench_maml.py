"""Time one MAML meta-step: metarobust (loop and vmap executions) against peers, in one run.

Same model (Conv-4, 64 filters), same tasks (5-way 1-shot, 15 queries per class, 28x28
single-channel, meta-batch 16), same inner loop (SGD, second order unless --first-order).
Peers: a plain per-task loop (``functional_call`` + ``torch.autograd.grad(create_graph=True)``),
``higher`` (Grefenstette et al.) and ``learn2learn`` (Arnold et al.) where they import.

Each variant runs in its own process so its peak memory (max RSS) is its own. Prints a table,
the ratios, and ends with one JSON line: ``speedup_vs_loop``, ``speedup_vs_higher``, ...
(our fastest execution on this device over each peer; > 1 means we are faster).

    python scripts/bench_maml.py                 # CPU, defaults above
    python scripts/bench_maml.py --device cuda   # on a GPU
    python scripts/bench_maml.py --recipe r_maml # the robust recipe (FGSM-RS inside each task)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ["metarobust_loop", "metarobust_vmap", "plain_loop", "higher", "learn2learn"]


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


def run_variant(name: str, args) -> dict:
    torch, device, sampler, model = make_workload(args)
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    lr, steps, first_order = args.inner_lr, args.inner_steps, args.first_order

    if name.startswith("metarobust"):
        from metarobust.attacks import LinfPGD
        from metarobust.config import ExperimentConfig
        from metarobust.meta.execution import meta_backward
        from metarobust.meta.functional import functional_forward, params_of
        from metarobust.meta.maml import MAML
        from metarobust.training.recipes import RECIPES

        execution = name.split("_")[1]
        learner = MAML(functional_forward(model), lr, steps, first_order)
        attack = LinfPGD(8 / 255, 10 / 255, 1)
        task_fn = RECIPES.get(args.recipe)(ExperimentConfig(), learner, attack)
        params = params_of(model)
        gen = torch.Generator(device=device).manual_seed(1)

        def step(batch):
            noise = attack.init_noise(batch.query_x, gen) if args.recipe != "maml" else None
            meta_backward(task_fn, params, batch, noise, execution)

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

    elif name == "higher":
        import higher

        inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

        def step(batch):
            for t in range(batch.num_tasks):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                          track_higher_grads=not first_order) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(F.cross_entropy(fmodel(batch.support_x[t]), batch.support_y[t]))
                    q = F.cross_entropy(fmodel(batch.query_x[t]), batch.query_y[t])
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
        optimizer.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    result = {"variant": name, "seconds": times[len(times) // 2],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe", default="maml", help="maml | adversarial_querying | r_maml "
                        "(peers run plain MAML only, so they are timed with --recipe maml)")
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
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return

    variants = [v for v in args.variants.split(",") if v]
    if args.recipe != "maml":
        variants = [v for v in variants if v.startswith("metarobust")]
    results = {}
    for name in variants:
        if not available(name):
            print(f"{name:<18} skipped (not importable here)")
            continue
        argv = [a for a in sys.argv[1:] if not a.startswith("--variants")]
        out = subprocess.run([sys.executable, __file__, *argv, "--child", name],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name:<18} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        extra = f"  peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
        print(f"{name:<18} {r['seconds'] * 1000:9.1f} ms/meta-step   max RSS {r['max_rss_mb']:7.0f} MB{extra}",
              flush=True)

    ours = {k: v for k, v in results.items() if k.startswith("metarobust")}
    import torch

    default = "vmap" if args.device.startswith("cuda") else "loop"
    best = ours.get(f"metarobust_{default}") or min(ours.values(), key=lambda r: r["seconds"])
    headline = {"device": args.device, "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "recipe": args.recipe, "meta_batch": args.meta_batch,
                "inner_steps": args.inner_steps, "second_order": not args.first_order,
                "default_execution": default, "ms_per_step": {k: round(v["seconds"] * 1000, 1) for k, v in results.items()}}
    for peer in ("plain_loop", "higher", "learn2learn"):
        if peer in results:
            ratio = results[peer]["seconds"] / best["seconds"]
            key = "loop" if peer == "plain_loop" else peer
            headline[f"speedup_vs_{key}"] = round(ratio, 3)
            headline[f"memory_ratio_vs_{key}"] = round(best["max_rss_mb"] / results[peer]["max_rss_mb"], 3)
            print(f"ours ({default}) vs {peer}: {ratio:.2f}x speed, "
                  f"{best['max_rss_mb'] / results[peer]['max_rss_mb']:.2f}x memory")
    if "metarobust_vmap" in ours and "metarobust_loop" in ours:
        headline["vmap_over_loop"] = round(ours["metarobust_loop"]["seconds"] / ours["metarobust_vmap"]["seconds"], 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
