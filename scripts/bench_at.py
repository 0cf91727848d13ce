"""Time PGD adversarial training: metarobust's engine against a plain hand-written PyTorch
PGD-AT loop on the same model and data, and against natural training, in one run.

Variants, each ``--iters`` SGD steps on mini-batches of ``--batch`` real training images:

- ``ours``: ``metarobust.training.engine.Trainer`` with recipe ``pgd_at`` (the device
  sampler, the recipe's PGD, schedule per step, metrics synced every ``train.log_every`` steps).
- ``plain``: the loop people write (Rice et al.'s ``attack_pgd`` shape): a shuffled index per
  epoch, gather the batch, ``steps`` x (forward, ``torch.autograd.grad`` of the CE w.r.t. delta,
  sign step, clamp to the eps-ball and the image box), then forward, backward, SGD step.
- ``natural``: ``Trainer`` with recipe ``natural`` (clean CE, no attack).

Same initial weights, same attack (L-inf PGD, uniform random start, ``--steps`` steps of
``--alpha`` within ``--eps``), BatchNorm in train mode during the attack for both PGD-AT
variants (Madry's and Rice's convention). Variants run interleaved (A B C A B C ...) after a
warm-up and the median is reported (robust to other load on a shared machine).

Ends with one JSON line: ``speedup_vs_plain_loop`` (plain time / ours; > 1: the engine is
faster, ~1: no overhead), ``at_over_natural`` (PGD-AT time / natural time; the ideal is
``steps + 1``: one forward/backward per attack step plus the update), images/second of each
variant, and the machine.

    python scripts/bench_at.py                                   # CPU: small CNN on MNIST
    python scripts/bench_at.py --model preact_resnet18 --dataset cifar10 --root ../shared/data/cifar10-jpg
    python scripts/bench_at.py --device cuda --amp bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_attacks import cpu_name, time_interleaved  # noqa: E402  (scripts/ is on sys.path when a script runs)

from metarobust.config import DataConfig, load_config  # noqa: E402
from metarobust.data.datasets import load_split  # noqa: E402
from metarobust.models import build_model  # noqa: E402
from metarobust.training.data import TrainingData, take  # noqa: E402
from metarobust.training.engine import Trainer  # noqa: E402


def plain_pgd_at(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, args, device) -> None:
    """The hand-written PGD-AT loop (the reference the engine is timed against)."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator(device=device).manual_seed(1)
    order = torch.randperm(len(labels), generator=generator, device=device)
    model.train()
    for i in range(args.iters):
        index = order[i * args.batch:(i + 1) * args.batch]
        x = images[index].float().div_(255)
        y = labels[index]
        delta = (torch.rand(x.shape, generator=generator, device=device) * 2 - 1) * args.eps
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(args.steps):
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + args.alpha * grad.sign()).clamp(-args.eps, args.eps)
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).detach()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small_cnn", help="a registry name (metarobust list models)")
    p.add_argument("--hidden", type=int, default=64, help="model.hidden (64: the paper's width)")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--root", default=None, help="data.root (default: ../shared/data/<dataset>)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="SGD steps per timed run")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--eps", type=float, default=None, help="default: 0.3 (MNIST) or 8/255")
    p.add_argument("--alpha", type=float, default=None, help="default: eps / 4")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="ours only")
    p.add_argument("--channels-last", action="store_true", help="ours only")
    p.add_argument("--compile", action="store_true", help="ours only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mnist_like = args.dataset in ("mnist", "fashion_mnist")
    args.eps = args.eps if args.eps is not None else (0.3 if mnist_like else 8 / 255)
    args.alpha = args.alpha if args.alpha is not None else args.eps / 4
    root = args.root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                     {"fashion_mnist": "fashion-mnist", "cifar10": "cifar10-jpg"}.get(args.dataset,
                                                                                                     args.dataset))
    count = args.iters * args.batch
    train = load_split(DataConfig(dataset=args.dataset, root=root), "train")
    train = take(train, torch.arange(count), train.name).to(device)
    data = TrainingData(train, None, None)

    overrides = [f"data.dataset={args.dataset}", f"data.root={root}", f"model.name={args.model}",
                 f"model.hidden={args.hidden}", f"device={args.device}", f"at.batch_size={args.batch}", "at.epochs=1",
                 "optim.schedule=constant", f"optim.lr={args.lr}", "optim.weight_decay=5e-4", "at.augment=none",
                 f"at.amp={args.amp}", f"at.channels_last={args.channels_last}", f"at.compile={args.compile}",
                 f"train.log_every={args.iters}", f"train.checkpoint_every={args.iters}", "train_attack.name=pgd",
                 f"train_attack.eps={args.eps}", f"train_attack.steps={args.steps}",
                 f"train_attack.step_size={args.alpha}", "train_attack.random_start=true"]
    cfgs = {name: load_config(None, [*overrides, f"recipe={name}"]) for name in ("pgd_at", "natural")}
    torch.manual_seed(0)
    model_cfg = cfgs["pgd_at"].model
    shape = train.image_shape

    def run_ours(recipe: str) -> None:  # building the trainer (model, sampler) is timed too: ~ms
        Trainer(cfgs[recipe], data=data, progress=False).fit()

    def run_plain() -> None:
        torch.manual_seed(0)
        model = build_model(model_cfg, shape[0], train.num_classes, shape[-1], args.dataset).to(device)
        plain_pgd_at(model, train.images, train.labels, args, device)

    variants = {"ours": lambda: run_ours("pgd_at"), "plain": run_plain, "natural": lambda: run_ours("natural")}
    times = time_interleaved(variants, device, warmup=1, repeats=args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    images = args.iters * args.batch
    print(f"{args.model} (hidden {args.hidden}) on {args.dataset}, batch {args.batch}, {args.iters} steps, "
          f"PGD-{args.steps} eps {args.eps:.4f}, device {args.device}, {args.threads} threads")
    print(f"{'variant':<10} {'median s':>10} {'min s':>8} {'images/s':>10}")
    for name in variants:
        print(f"{name:<10} {med[name]:>10.2f} {min(times[name]):>8.2f} {images / med[name]:>10.1f}")
    result = {
        "speedup_vs_plain_loop": round(med["plain"] / med["ours"], 3),
        "speedup_vs_plain_loop_min": round(min(times["plain"]) / min(times["ours"]), 3),
        "at_over_natural": round(med["ours"] / med["natural"], 2),
        "ideal_at_over_natural": args.steps + 1,
        "images_per_s_ours": round(images / med["ours"], 1),
        "images_per_s_plain": round(images / med["plain"], 1),
        "images_per_s_natural": round(images / med["natural"], 1),
        "model": args.model, "hidden": args.hidden, "dataset": args.dataset, "batch": args.batch,
        "iters": args.iters, "pgd_steps": args.steps, "amp": args.amp, "channels_last": args.channels_last,
        "compile": args.compile, "device": args.device,
        "machine": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads, "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
