"""Time white-box attacks: metarobust against torchattacks and against the floor, in one run.

Same model, same batch, same budget for every variant:

- ``pgd10``: our L-inf PGD-10 (``metarobust.attacks.PGD``, random start, eps 8/255, step 2/255)
  against ``torchattacks.PGD`` with the same eps/alpha/steps.
- ``floor``: 10 forward + backward passes of the model w.r.t. the input in a bare loop
  (``torch.autograd.grad`` of the summed cross-entropy); no attack can do its 10 steps faster.
  ``floor_func`` is the same loop with ``torch.func.grad`` (what our attacks use so that they
  run under ``vmap``), to separate the cost of the transform from the cost of the attack.
- ``apgd100``: our APGD-CE, 100 steps (``metarobust.attacks.apgd.APGD``, if that module exists),
  against ``torchattacks.APGD`` (norm Linf, loss ce, 1 restart, eot_iter 1).

The model is in eval mode, the labels are its own clean predictions (so every point starts
correctly classified and early stopping has nothing to skip; our attacks compute the whole
batch at every step regardless). Variants are timed interleaved (A B C A B C ...) after a
warm-up, and the median is reported, to be robust to other load on a shared machine.

Prints a table and ends with one JSON line: ``speedup_vs_torchattacks_pgd10`` (torchattacks
time / ours; > 1: we are faster), ``overhead_vs_floor_pgd10`` (ours / floor - 1),
``speedup_vs_torchattacks_apgd100`` when APGD is available (all from median times; the
``*_min`` keys use the fastest repeat, the better estimate when other jobs share the machine),
and the machine.

    python scripts/bench_attacks.py                    # CPU, 2 threads, Conv-4 on 32x32x3, batch 128
    python scripts/bench_attacks.py --device cuda      # on a GPU (synchronised timing)
    python scripts/bench_attacks.py --compile          # torch.compile the model's forward
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metarobust.attacks.pgd import PGD

MODELS = {
    # name -> (builder, input shape without batch)
    "conv4": (lambda: _conv4(), (3, 32, 32)),
}


def _conv4():
    from metarobust.models.conv4 import Conv4

    return Conv4(3, 10, 32)


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


def time_interleaved(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="conv4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--alpha", type=float, default=2 / 255)
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--apgd-repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the model's forward (all variants)")
    p.add_argument("--no-apgd", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    build, shape = MODELS[args.model]
    model = build().to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)  # the attack differentiates w.r.t. the input only
    forward = torch.compile(model) if args.compile else model
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, *shape, generator=g, device=device)
    with torch.no_grad():
        y = forward(x).argmax(dim=1)

    import torchattacks

    class Wrapped(torch.nn.Module):  # torchattacks takes a module; give it the same forward
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, v):
            return forward(v)

    ta_model = Wrapped().eval()
    ours = PGD("linf", args.eps, args.alpha, args.steps)
    ta_pgd = torchattacks.PGD(ta_model, eps=args.eps, alpha=args.alpha, steps=args.steps, random_start=True)

    def run_ours():
        return ours(forward, x, y, noise=ours.init_noise(x, g))

    def run_ta():
        return ta_pgd(x, y)

    def run_floor():
        v = x.detach().requires_grad_(True)
        for _ in range(args.steps):
            (grad,) = torch.autograd.grad(F.cross_entropy(forward(v), y, reduction="sum"), v)
        return grad

    grad_fn = torch.func.grad(lambda v: F.cross_entropy(forward(v), y, reduction="sum"))

    def run_floor_func():
        for _ in range(args.steps):
            grad = grad_fn(x)
        return grad

    pgd_fns = {"floor": run_floor, "floor_func": run_floor_func, "ours_pgd": run_ours,
               "torchattacks_pgd": run_ta}
    times = time_interleaved(pgd_fns, device, args.warmup, args.repeats)

    apgd_fns = {}
    apgd_note = None
    if not args.no_apgd:
        try:
            from metarobust.attacks.apgd import APGD

            ours_apgd = APGD(norm="linf", eps=args.eps, steps=args.apgd_steps, restarts=1, loss="ce")
            ta_apgd = torchattacks.APGD(ta_model, norm="Linf", eps=args.eps, steps=args.apgd_steps,
                                        n_restarts=1, loss="ce", seed=0, eot_iter=1, rho=0.75)

            def run_ours_apgd():
                return ours_apgd(forward, x, y, noise=ours_apgd.init_noise(x, g))

            apgd_fns = {"ours_apgd": run_ours_apgd, "torchattacks_apgd": lambda: ta_apgd(x, y)}
        except Exception as e:  # noqa: BLE001  (missing module or a different signature: skip, say why)
            apgd_note = f"APGD skipped: {type(e).__name__}: {e}"
    if apgd_fns:
        times.update(time_interleaved(apgd_fns, device, 0, args.apgd_repeats))  # kernels warm from PGD

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model} {tuple(shape)}, batch {args.batch}, device {device}, threads {args.threads}, "
          f"compile {args.compile}, torch {torch.__version__}, torchattacks {torchattacks.__version__}")
    print(f"{'variant':<20}{'median s':>10}{'min s':>10}{'images/s':>12}")
    for k in times:
        print(f"{k:<20}{med[k]:>10.4f}{min(times[k]):>10.4f}{args.batch / med[k]:>12.1f}")
    result = {
        "speedup_vs_torchattacks_pgd10": round(med["torchattacks_pgd"] / med["ours_pgd"], 3),
        "overhead_vs_floor_pgd10": round(med["ours_pgd"] / med["floor"] - 1, 3),
        "overhead_func_grad_vs_floor": round(med["floor_func"] / med["floor"] - 1, 3),
        "images_per_s_ours_pgd10": round(args.batch / med["ours_pgd"], 1),
        "images_per_s_torchattacks_pgd10": round(args.batch / med["torchattacks_pgd"], 1),
    }
    best = {k: min(v) for k, v in times.items()}
    result["speedup_vs_torchattacks_pgd10_min"] = round(best["torchattacks_pgd"] / best["ours_pgd"], 3)
    result["overhead_vs_floor_pgd10_min"] = round(best["ours_pgd"] / best["floor"] - 1, 3)
    if apgd_fns:
        result["speedup_vs_torchattacks_apgd100"] = round(med["torchattacks_apgd"] / med["ours_apgd"], 3)
    elif apgd_note:
        print(apgd_note)
    result.update({
        "model": args.model, "batch": args.batch, "steps": args.steps, "compile": args.compile,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    })
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
