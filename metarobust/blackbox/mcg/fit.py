"""``metarobust blackbox-train CONFIG``: train MCG's generator on our own surrogate runs.

Surrogates are run folders of ``metarobust train`` (plain classifiers of one dataset). Their
dataset's *training* images (a seeded subset of ``images``) give stage 1's data, MI-FGSM
transfer pairs from every surrogate (:func:`~metarobust.blackbox.mcg.transfer_pairs`), and
stage 2's tasks; stage 1 (:func:`~metarobust.blackbox.mcg.pretrain`) then stage 2
(:func:`~metarobust.blackbox.mcg.meta_train`) run with :class:`MCGConfig`'s paper defaults
unless ``mcg`` overrides them. No target is queried.

It resumes: the generator after stage 1 is kept as ``<out>.stage1.pt`` and reused, stage 2
writes ``<out>.stage2.pt`` after every epoch (weights and the random state, so a resumed run
draws what the uninterrupted one would), and a finished ``out`` with the same settings is
reused. All three are written atomically (:mod:`~metarobust.blackbox.mcg.checkpoint`); a file
made with other settings is refused rather than mixed in.

    metarobust blackbox-train configs/blackbox/mcg_train_mnist.yaml surrogates=[runs/a] out=runs/g.pt
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarobust.blackbox.mcg.checkpoint import load_generator, save_generator
from metarobust.blackbox.mcg.config import GeneratorConfig, MCGConfig, known_fields
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.blackbox.mcg.training import meta_train, pretrain, transfer_pairs
from metarobust.errors import ConfigError

STAGE1_FIELDS = ("transfer_steps", "transfer_decay", "confidence", "pretrain_lr", "pretrain_batch", "pretrain_epochs",
                 "pretrain_clip", "pretrain_noise")
"""The :class:`MCGConfig` fields stage 1 depends on: a stage-1 checkpoint is reused when they and
the data, surrogates, threat model and generator are unchanged, whatever stage 2's settings."""


@dataclass
class MCGTrainConfig:
    """A ``blackbox-train`` config; the generator's and MCG's defaults are the paper's."""

    surrogates: list[str] = field(default_factory=list)
    """Run folders or checkpoints of ``metarobust train`` (one dataset)."""
    out: str = ""
    """The generator checkpoint to write (``metarobust blackbox`` reads it as ``mcg.generator``)."""
    norm: str = "linf"
    eps: float | None = None
    """Radius; ``null``: the first surrogate's ``attack.eps`` (L-inf) or 0.5 (L2)."""
    images: int = 0
    """Training images (a seeded subset of the train split); 0: all of them."""
    chunk: int = 256
    """Images per MI-FGSM batch (memory only)."""
    generator: dict[str, Any] = field(default_factory=dict)
    """:class:`GeneratorConfig` fields (``levels``, ``steps``, ``hidden``...; MNIST's 28 pixels
    need ``levels: 2``)."""
    mcg: dict[str, Any] = field(default_factory=dict)
    """:class:`MCGConfig` fields (``pretrain_epochs``, ``meta_epochs``, ``transfer_steps``...)."""
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """Overrides of the surrogate runs' configs (``device=cpu``, ``data.root=...``)."""

    def check(self) -> None:
        if not self.surrogates:
            raise ConfigError("blackbox-train surrogates is empty; name run folders of metarobust train")
        for path in self.surrogates:
            if not Path(path).exists():
                raise ConfigError(f"blackbox-train surrogates: {path!r} does not exist; expected a run folder "
                                  f"or a checkpoint")
        if not self.out:
            raise ConfigError("blackbox-train out is empty; name the generator checkpoint to write (runs/mcg.pt)")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"blackbox-train norm={self.norm!r}; choose linf or l2")
        if self.images < 0 or self.chunk < 1:
            raise ConfigError(f"blackbox-train images={self.images} must be >= 0 and chunk={self.chunk} >= 1")
        self.mcg_config()

    def mcg_config(self) -> MCGConfig:
        return MCGConfig(**known_fields(MCGConfig, self.mcg, "blackbox-train mcg"))

    def generator_config(self, shape: tuple[int, int, int], eps: float) -> GeneratorConfig:
        values = known_fields(GeneratorConfig, self.generator, "blackbox-train generator")
        for fixed in ("shape", "norm", "eps"):
            if fixed in values:
                raise ConfigError(f"blackbox-train generator.{fixed} is set from the data and the threat model "
                                  f"(norm, eps); remove it")
        return GeneratorConfig(shape=shape, norm=self.norm, eps=eps, **values)


def load_train_config(path: str | Path, overrides: list[str] | None = None, check: bool = True) -> MCGTrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides; checked (``check``:
    also that the surrogate runs exist)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(MCGTrainConfig), OmegaConf.load(path),
                             OmegaConf.from_dotlist(overrides or []))
    cfg = MCGTrainConfig(**OmegaConf.to_container(merged))
    if check:
        cfg.check()
    else:
        cfg.mcg_config()
    return cfg


def training_images(cfg: MCGTrainConfig):
    """``(surrogates, x [N, C, H, W] in [0, 1], y [N], eps, device)`` from the surrogate runs and
    their dataset's training split."""
    from metarobust.data.datasets import load_split
    from metarobust.experiment import model_from_checkpoint
    from metarobust.training.data import resolve_device

    loaded = [model_from_checkpoint(path, cfg.overrides) for path in cfg.surrogates]
    run_cfg = loaded[0][0]
    datasets = {c.data.dataset for c, _, _ in loaded}
    if len(datasets) > 1:
        raise ConfigError(f"blackbox-train surrogates were trained on different datasets {sorted(datasets)}; "
                          f"give surrogates of one dataset")
    device = resolve_device(run_cfg.device)
    store = load_split(run_cfg.data, "train")
    index = torch.randperm(len(store), generator=torch.Generator().manual_seed(cfg.seed))
    index = index[:cfg.images] if cfg.images else index
    x = store.images[index].float().div(255).to(device)
    y = store.labels[index].to(device)
    eps = cfg.eps if cfg.eps is not None else (run_cfg.attack.eps if cfg.norm == "linf" else 0.5)
    return [m for _, m, _ in loaded], x, y, float(eps), device


def _reusable(path: Path, settings: dict[str, Any]) -> tuple[MCGGenerator, dict[str, Any]] | None:
    """The generator saved at ``path`` if it exists and was made with ``settings``."""
    if not path.is_file():
        return None
    generator, info = load_generator(path)
    if info.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(info.get("settings", {}))
                         if settings.get(k) != info.get("settings", {}).get(k))
        raise ConfigError(f"{path} was made with other settings ({changed}); delete it to train again, or give "
                          f"another out")
    return generator, info


def train_generator(cfg: MCGTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Stage 1 then stage 2 on ``cfg``'s surrogates, resuming from what a killed run left;
    writes ``cfg.out`` and returns a summary (paths, pair and image counts, the per-epoch NLL
    and surrogate margins, seconds)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(cfg.out)
    stage1, stage2 = out.with_name(out.name + ".stage1.pt"), out.with_name(out.name + ".stage2.pt")
    surrogates, x, y, eps, device = training_images(cfg)
    mcg_cfg = cfg.mcg_config()
    gen_cfg = cfg.generator_config(tuple(x.shape[1:]), eps)
    settings = {**{k: v for k, v in asdict(cfg).items() if k not in ("out", "overrides", "chunk")}, "eps": eps,
                "generator": asdict(gen_cfg), "mcg": asdict(mcg_cfg)}
    settings = _plain(settings)
    first = {**settings, "mcg": {k: v for k, v in settings["mcg"].items() if k in STAGE1_FIELDS}}
    done = _reusable(out, settings)
    if done is not None:
        return {**done[1]["summary"], "resumed": "done"}
    resumed = None
    found = _reusable(stage1, first)
    if found is None:
        pairs_x, pairs_delta = [], []
        for s in surrogates:
            for lo in range(0, len(x), cfg.chunk):
                xs, deltas, _ = transfer_pairs(s, x[lo:lo + cfg.chunk], y[lo:lo + cfg.chunk], cfg.norm, eps, mcg_cfg)
                pairs_x.append(xs)
                pairs_delta.append(deltas)
        xs, deltas = torch.cat(pairs_x), torch.cat(pairs_delta)
        if not len(xs):
            raise ConfigError(f"blackbox-train: no training image is classified correctly by a surrogate with "
                              f"confidence in mcg.confidence={mcg_cfg.confidence}; widen it or check the runs")
        torch.manual_seed(cfg.seed)  # the flow's fixed permutations
        generator = MCGGenerator(gen_cfg).to(device)
        bar = tqdm(total=mcg_cfg.pretrain_epochs, desc="mcg stage 1 (NLL)", disable=not progress, dynamic_ncols=True)

        def tick(_: int, nll: float) -> None:
            bar.update()
            bar.set_postfix(bits=f"{nll:.3f}")

        nll = pretrain(generator, xs, deltas, mcg_cfg, torch.Generator(device=device).manual_seed(cfg.seed),
                       on_epoch=tick)
        bar.close()
        info = {"settings": first, "pairs": len(xs), "nll": nll}
        save_generator(stage1, generator, info)
    else:
        generator, info = found
        generator = generator.to(device)
        resumed = "stage1"
    pairs, nll = info["pairs"], info["nll"]
    rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    margins: list[float] = []
    partial = _reusable(stage2, settings)
    if partial is not None:
        generator, info = partial
        generator = generator.to(device)
        rng.set_state(info["rng"])
        margins, resumed = list(info["margins"]), f"stage2 epoch {len(info['margins'])}"
    bar = tqdm(total=mcg_cfg.meta_epochs, initial=len(margins), desc="mcg stage 2 (Reptile)", disable=not progress,
               dynamic_ncols=True)
    while len(margins) < mcg_cfg.meta_epochs:
        margins += meta_train(generator, surrogates, x, y, mcg_cfg, rng, epochs=1)
        save_generator(stage2, generator, {"settings": settings, "pairs": pairs, "nll": nll, "margins": margins,
                                           "rng": rng.get_state()})
        bar.update()
        bar.set_postfix(margin=f"{margins[-1]:.3f}")
    bar.close()
    summary = {"generator": str(out), "surrogates": list(cfg.surrogates), "norm": cfg.norm, "eps": eps,
               "images": len(x), "pairs": pairs, "stage1_nll": nll, "stage2_margin": margins,
               "seconds": round(time.perf_counter() - start, 1)}
    save_generator(out, generator, {"settings": settings, "summary": summary})
    stage2.unlink(missing_ok=True)  # the final file holds it; stage 1's is kept for a retrained stage 2
    return {**summary, "resumed": resumed}


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what a checkpoint's info compares equal to after loading."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["MCGTrainConfig", "load_train_config", "train_generator", "training_images"]
