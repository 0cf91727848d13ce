"""Mutual Adversarial Training (Liu, Lau, Souri, Feizi & Chellappa, "Mutual Adversarial
Training: Learning together is better than going alone", arXiv 2112.05005, IEEE TIFS 2022).

No code was released. The structure follows the abstract (models "trained together", sharing
"the knowledge of adversarial examples" through distillation); the exact loss, alpha, tau and the
inputs distilled on are a reconstruction, [R] in ``shared/methods/ADVERSARIAL_TRAINING.md`` 4.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from metarobust.attacks.losses import kl_from_clean
from metarobust.attacks.pgd import PGD
from metarobust.config import NORMS, ExperimentConfig, check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.models import MODELS
from metarobust.training.objectives import (
    TRADES_START_SIGMA,
    accuracy,
    gaussian_start,
    tempered_kl,
    trades_kl,
)
from metarobust.training.recipes.base import Models, Recipe, Role, Stats, StepContext, register_recipe
from metarobust.training.recipes.trades import trades_attack_target


@config_section("mat")
@dataclass
class MATConfig:
    """Mutual Adversarial Training (``recipe: mat``; Liu et al. 2021/2022). The loss is a
    reconstruction ([R] in ``shared/methods/ADVERSARIAL_TRAINING.md`` 4.1): the paper's alpha,
    temperature and input sets are unverified."""

    peers: int = 2
    """Models trained together when ``norms`` is empty (N = 2)."""
    alpha: float = 0.5
    """Weight of the mutual distillation term; ``1 - alpha`` weighs each model's own AT loss."""
    temperature: float = 1.0
    """Distillation temperature tau: ``tau^2 KL(p_j^tau || p_i^tau)`` over the pooled examples."""
    base: str = "ce"
    """Each model's own AT loss: ``ce`` (CE on its PGD examples) or ``trades`` (MAT-TRADES:
    ``CE(x) + at.beta KL(p(x) || p(x'))`` with the KL attack)."""
    norms: list[str] = field(default_factory=list)
    """Multi-perturbation MAT: one specialist per norm (e.g. ``[linf, l2, l1]``), each attacked in
    its own norm at ``eps[norm]``; empty: ``peers`` models attacked with ``train_attack``."""
    eps: dict[str, float] = field(default_factory=lambda: {"linf": 0.03, "l2": 0.5, "l1": 12.0})
    """Radii of the multi-perturbation threat models (Maini et al.'s CIFAR-10 defaults); each
    attack takes ``train_attack.steps`` steps of ``2.5 eps / steps`` from a random start."""
    generalist: bool = True
    """Multi-perturbation: add a generalist peer attacked in every norm of ``norms``; it is the
    deployed model."""
    models: list[str] = field(default_factory=list)
    """Architecture (``model.name``) of each peer, in order; empty: ``model.name`` for all."""

    def check(self) -> None:
        check_value(self.peers >= 2, "mat.peers", self.peers, "an integer >= 2 (models trained together)")
        check_value(0 <= self.alpha <= 1, "mat.alpha", self.alpha, "a weight in [0, 1]")
        check_value(self.temperature > 0, "mat.temperature", self.temperature, "a temperature > 0")
        check_value(self.base in ("ce", "trades"), "mat.base", self.base, "ce or trades")
        check_value(all(n in NORMS for n in self.norms) and len(set(self.norms)) == len(self.norms),
                    "mat.norms", list(self.norms), "distinct norms among linf, l2, l1 (e.g. [linf, l2, l1]), or []")
        for norm in self.norms:
            check_value(norm in self.eps and self.eps[norm] > 0, f"mat.eps.{norm}", self.eps.get(norm),
                        "a radius > 0 for every norm of mat.norms")
        check_value(all(n in NORMS for n in self.eps), "mat.eps", dict(self.eps),
                    "norm -> eps with norms among linf, l2, l1")


@dataclass(frozen=True)
class Peer:
    """One MAT model: its role name and the threat models it is attacked in (a specialist has
    one, the multi-perturbation generalist one per norm)."""

    name: str
    attacks: tuple[PGD, ...]


@register_recipe("mat", "MAT (Liu et al. 2022) [R]: N peers, each attacked, distil from each other over "
                          "the pooled adversarial examples; mat.norms=[linf,l2,l1]: multi-perturbation")
class MAT(Recipe):
    """Peers ``f_1..f_N`` trained together (``mat.peers``, 2). Per mini-batch ``(x, y)``:

    1. every peer attacks itself: ``x'_i = PGD(f_i, x, y)`` (``train_attack``; eval-mode BN);
    2. the adversarial batches are pooled, ``S = [x'_1; ...; x'_N]`` (``[N*B, C, H, W]``), and every
       peer scores the whole pool in one train-mode forward (its BN sees every peer's examples);
    3. the loss of peer i is
       ``(1 - alpha) L_AT(f_i; x'_i, y) + alpha mean_{j != i} tau^2 KL(p_j^tau(S) || p_i^tau(S))``
       (KL averaged over the pool; the peers' predictions detached, so they act as teachers);
       ``L_AT`` is CE on ``x'_i`` (``mat.base=ce``) or TRADES, ``CE(f_i(x), y) + at.beta
       KL(p_i(x) || p_i(x'_i))`` with the KL attack (``trades``);
    4. one SGD step on the sum over peers: with the teachers detached, each peer receives exactly
       the gradient of its own loss, so this is N optimizers stepped together.

    **Multi-perturbation MAT** (``mat.norms=[linf, l2, l1]``, the TIFS version's specialists
    and generalist, [R]): one specialist per norm, attacked in that norm at ``mat.eps[norm]``
    (0.03 / 0.5 / 12, Maini et al.'s CIFAR-10 radii) with ``train_attack.steps`` steps of
    ``2.5 eps / steps`` from a random start, plus (``mat.generalist``) a generalist attacked in
    every norm, whose ``L_AT`` averages its CE over the norms. All of them distil from each other
    over the pool of every adversarial batch. The generalist is the deployed model; evaluate it
    against the union with ``eval.union: {l2: 0.5, l1: 12.0}`` (``configs/at/cifar10_mat_union.yaml``).

    Defaults ([R], unverified against the paper): ``alpha`` 0.5, ``tau`` 1, PGD-10 at 8/255 with
    step 2/255. The first peer (``model``) is deployed; ``mat.models`` gives the other peers'
    architectures (MAT's peers may differ). Cost: about N times PGD-AT.

    Example:
        >>> cfg = load_config("configs/at/cifar10_mat.yaml", ["mat.peers=3"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.config_check(cfg)
        super().__init__(cfg)
        m = cfg.mat
        a = cfg.train_attack
        if m.norms:
            def threat_model(norm: str) -> PGD:
                eps = m.eps[norm]
                return self.train_attack(norm=norm, eps=eps, step_size=2.5 * eps / a.steps, random_start=True)

            peers = [Peer(f"specialist_{n}", (threat_model(n),)) for n in m.norms]
            if m.generalist:
                peers.insert(0, Peer("model", tuple(threat_model(n) for n in m.norms)))
            else:
                peers[0] = replace(peers[0], name="model")
        else:
            peers = [Peer("model" if i == 0 else f"peer{i}", (self.train_attack(),)) for i in range(m.peers)]
        self.peers = peers
        self.alpha, self.temperature, self.base = m.alpha, m.temperature, m.base

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        m = cfg.mat
        if cfg.at.init:
            raise ConfigError(f"at.init={cfg.at.init!r}: mat trains its peers from different random starts "
                              f"(identical peers have nothing to teach each other); unset at.init")
        count = (len(m.norms) + int(m.generalist)) if m.norms else m.peers
        if count < 2:
            raise ConfigError(f"mat.norms={list(m.norms)} with mat.generalist={m.generalist} gives "
                              f"{count} model; MAT needs >= 2 (add a norm or set mat.generalist=true)")
        if m.models and len(m.models) != count - 1:
            raise ConfigError(f"mat.models={list(m.models)} lists {len(m.models)} architectures; give "
                              f"one per peer after the deployed one ({count - 1}), or [] for model.name")


        for name in m.models:
            MODELS.get(name, "mat.models")

    def roles(self) -> list[Role]:
        names = list(self.cfg.mat.models)  # the peers after the deployed one; []: model.name
        return [Role(p.name, model=replace(self.cfg.model, name=names[i - 1]) if i and names else None)
                for i, p in enumerate(self.peers)]

    def adversarial(self, models: Models, peer: Peer, attack: PGD, batch: EpisodeBatch,
                    ctx: StepContext) -> torch.Tensor:
        """Peer ``peer``'s adversarial batch ``[B, C, H, W]`` in one of its threat models."""
        raw = models.raw[peer.name]
        if self.base == "trades":
            target = trades_attack_target(raw, batch.x, self.bn)
            if attack.norm == "linf":
                noise = gaussian_start(batch.x, TRADES_START_SIGMA, attack.eps, ctx.generator)
            else:
                noise = attack.init_noise(batch.x, ctx.generator)
            return self.attack(raw, attack, batch.x, target, kl_from_clean, noise)
        return self.attack(raw, attack, batch.x, batch.y, noise=attack.init_noise(batch.x, ctx.generator))

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        size = x.shape[0]
        own: dict[str, list[int]] = {}  # peer -> its slots in the pool
        pool = []
        for peer in self.peers:
            own[peer.name] = []
            for attack in peer.attacks:
                own[peer.name].append(len(pool))
                pool.append(self.adversarial(models, peer, attack, batch, ctx))
        pool_x = torch.cat(pool)  # [P*B, C, H, W]: every peer's adversarial examples
        logits = {p.name: models[p.name](pool_x).float() for p in self.peers}  # [P*B, K] each
        total = x.new_zeros((), dtype=torch.float32)
        stats: Stats = {}
        kd_sum = total.detach().clone()
        for peer in self.peers:
            z = logits[peer.name]
            slots = [z[s * size:(s + 1) * size] for s in own[peer.name]]
            if self.base == "trades":
                clean = models[peer.name](x).float()
                at_loss = F.cross_entropy(clean, y) + self.at.beta * torch.stack(
                    [trades_kl(clean, adv) for adv in slots]).mean()
            else:
                at_loss = torch.stack([F.cross_entropy(adv, y) for adv in slots]).mean()
            others = [logits[p.name].detach() for p in self.peers if p.name != peer.name]
            kd = torch.stack([tempered_kl(t, z, self.temperature) for t in others]).mean()
            total = total + (1 - self.alpha) * at_loss + self.alpha * kd
            kd_sum = kd_sum + kd.detach()
            stats[f"adv_acc/{peer.name}"] = torch.stack([accuracy(adv, y) for adv in slots]).mean()
        stats["adv_acc"] = stats["adv_acc/model"]
        stats["kd"] = kd_sum / len(self.peers)
        return total, stats


__all__ = ["MAT", "Peer"]
