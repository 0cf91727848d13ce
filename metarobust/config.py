"""Typed experiment configs: dataclasses with the papers' defaults, YAML files, dotted overrides.

A YAML file under ``configs/`` overrides only what differs from these defaults, and the command
line overrides the file::

    metarobust train configs/meta/omniglot_rmaml.yaml meta.train_shots=5 attack.eps=0.0392

Every value is checked before any work starts; a wrong key, type or value raises
:class:`~metarobust.errors.ConfigError` naming the key and what would be accepted.

Defaults follow R-MAML's code on Omniglot (Wang et al., ICLR 2021; ``shared/methods/META.md``
section 2.0/2.3): 5-way, 15 queries per class, meta-batch 4, inner SGD lr 0.01 with 5 steps at
training and 10 at test, Adam meta lr 1e-3, second order, eps 8/255 and PGD-10 with step 2/255
at evaluation, TRADES weight 5 for Omniglot. Epsilons are in [0, 1] pixel units (8/255 = 0.0314).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from metarobust.errors import ConfigError

EPS_8 = 8 / 255
STEP_2 = 2 / 255


@dataclass
class DataConfig:
    """Which dataset, and how its images are prepared."""

    dataset: str = "glyphs"
    """Registry name (``metarobust list datasets``)."""
    root: str | None = None
    """Where the files are (folder or zips); ``None``: ``$METAROBUST_DATA/<dataset>``, else
    ``~/.cache/metarobust/<dataset>``. The embedded ``glyphs`` set needs no files."""
    image_size: int = 28
    """Side length images are resized to (28 for Omniglot, as in Vinyals et al. and MAML)."""
    rotations: bool = False
    """Omniglot: add each character rotated by 90, 180, 270 degrees as three new classes."""
    download: bool = False
    """Fetch the official files into ``root`` if they are missing (needs internet)."""


@dataclass
class ModelConfig:
    name: str = "conv4"
    """Registry name (``metarobust list models``)."""
    hidden: int = 64
    """Filters per conv block (64: Vinyals et al., Finn et al.)."""
    norm: str = "batch"
    """``batch`` (per-forward batch statistics, as MAML) or ``none``."""


@dataclass
class MetaConfig:
    """Episodes and the MAML inner/outer loops."""

    ways: int = 5
    train_shots: int = 1
    """Support images per class at meta-training; independent of ``test_shots`` (ITS-MAML)."""
    test_shots: int = 1
    """Support images per class at evaluation."""
    queries: int = 15
    """Query images per class, training and evaluation."""
    meta_batch_size: int = 4
    """Tasks per meta-update."""
    inner_lr: float = 0.01
    inner_steps: int = 5
    """Clean SGD steps on the support set at meta-training."""
    test_inner_steps: int = 10
    """Clean SGD steps on the support set at evaluation (fine-tuning)."""
    first_order: bool = False
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-update."""
    execution: str = "auto"
    """``loop`` (one task at a time), ``vmap`` (all tasks at once), or ``auto`` (by device)."""


@dataclass
class AttackConfig:
    """A white-box attack and its budget (``metarobust list attacks``).

    L-inf PGD with ``steps=1, step_size=1.25*eps`` is FGSM with random start (fast AT).
    """

    name: str = "pgd"
    norm: str = "linf"
    """Threat model: ``linf``, ``l2`` or ``l1``."""
    eps: float = EPS_8
    """Radius of the ball in [0, 1] pixel units (L-inf 8/255 = 0.0314; L2 e.g. 0.5; L1 e.g. 12)."""
    steps: int = 10
    step_size: float = STEP_2
    """Step size (PGD, FGSM); APGD adapts its own from 2 eps."""
    random_start: bool = True
    restarts: int = 1
    """Independent random starts; a point counts as broken if any restart breaks it."""
    loss: str = "ce"
    """Objective maximised: ``ce`` (cross-entropy), ``dlr`` (Croce & Hein 2020), ``cw`` (CW margin)."""
    targeted: bool = False
    """Targeted mode: reach each of the ``target_classes`` most likely wrong classes in turn."""
    target_classes: int = 9
    """Targeted APGD: how many runner-up classes are tried (AutoAttack: 9)."""


@dataclass
class RobustConfig:
    """The robustness regulariser of ``r_maml`` (placed in the meta-update only)."""

    form: str = "trades"
    """``trades``: KL(p_clean || p_adv); ``ce``: cross-entropy on the adversarial query."""
    weight: float = 5.0
    """lambda / beta of the regulariser (R-MAML-TRADES on Omniglot: 5)."""


def _fgsm_rs() -> AttackConfig:
    # R-MAML trains with one FGSM step from a random start, step 1.25 eps (Wong et al.).
    return AttackConfig(steps=1, step_size=1.25 * EPS_8)


@dataclass
class TrainConfig:
    iterations: int = 15000
    """Meta-updates (60k tasks / meta-batch 4, as R-MAML)."""
    log_every: int = 50
    checkpoint_every: int = 500


@dataclass
class EvalConfig:
    episodes: int = 600
    """Frozen test episodes (``episodes/<dataset>/...``), the same for every method."""
    batch_size: int = 20
    """Episodes evaluated together."""
    manifest: str | None = None
    """A manifest path; ``None``: ``episodes/<dataset>/test_<N>way_<K>shot_<Q>query_<E>.json``."""
    suite: str = "single"
    """``metarobust eval``: ``single`` (the ``attack`` section) or ``autoattack`` (APGD-CE, then
    targeted APGD-DLR on the survivors, 100 steps each, in ``attack.norm`` at ``attack.eps``)."""
    union: dict[str, float] = field(default_factory=dict)
    """Extra threat models for the union, norm -> eps, e.g. ``{l2: 0.5, l1: 12.0}``: a point is
    robust only if it survives the suite in every threat model (and in ``attack.norm``)."""
    checks: bool = True
    """Run the gradient-masking checks (more steps, large eps, attack vs random noise)."""
    check_points: int = 200
    """Query points (or test images) the checks and the eps sweep use."""
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    """Multiples of ``attack.eps`` for the robust-accuracy-vs-eps plot."""


@dataclass
class ExperimentConfig:
    name: str = "run"
    recipe: str = "r_maml"
    """Registry name (``metarobust list recipes``)."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``..."""
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train_attack: AttackConfig = field(default_factory=_fgsm_rs)
    attack: AttackConfig = field(default_factory=AttackConfig)
    """The evaluation attack (PGD-10, random start, step 2/255, eps 8/255)."""
    robust: RobustConfig = field(default_factory=RobustConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated."""
    schema = OmegaConf.structured(ExperimentConfig)
    layers: list[Any] = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. meta.train_shots=5")
        layers.append(OmegaConf.from_dotlist([item]))
    try:
        merged = schema
        for layer in layers[1:]:
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ConfigError(_unknown_key_message(exc)) from None
    except ValidationError as exc:
        raise ConfigError(
            f"{exc.full_key}: {exc.msg.splitlines()[0]}; give a value of the field's type "
            f"(see metarobust/config.py)"
        ) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    assert isinstance(cfg, ExperimentConfig)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a nested dict (e.g. one saved in a checkpoint)."""
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), values)
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg  # type: ignore[return-value]


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _unknown_key_message(exc: ConfigKeyError) -> str:
    full_key = exc.full_key or str(exc.key)
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    section: Any = ExperimentConfig
    for part in parent.split(".") if parent else []:
        fields = {f.name: f for f in dataclasses.fields(section)}
        section = fields[part].default_factory()  # type: ignore[misc]
        section = type(section)
    known = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(str(exc.key), known, n=1)
    hint = f"did you mean {(parent + '.' if parent else '') + close[0]!r}? " if close else ""
    return f"unknown config key {full_key!r}; {hint}valid keys here: {known}"


def _check(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid; expected {accepted}")


def validate(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` on any impossible value (data-dependent checks come later)."""
    # Imported here: the registries import modules that import this one.
    from metarobust.data.datasets import DATASETS
    from metarobust.models import MODELS
    from metarobust.training.recipes import RECIPES

    RECIPES.get(cfg.recipe, "recipe")
    MODELS.get(cfg.model.name, "model.name")
    DATASETS.get(cfg.data.dataset, "data.dataset")
    _check(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
           "device", cfg.device, "auto, cpu, cuda or cuda:<index>")
    _check(cfg.data.image_size >= 8, "data.image_size", cfg.data.image_size, "an integer >= 8")
    _check(cfg.model.hidden >= 1, "model.hidden", cfg.model.hidden, "a positive integer")
    _check(cfg.model.norm in ("batch", "none"), "model.norm", cfg.model.norm, "batch or none")
    m = cfg.meta
    _check(m.ways >= 2, "meta.ways", m.ways, "an integer >= 2")
    for key in ("train_shots", "test_shots", "queries", "meta_batch_size"):
        _check(getattr(m, key) >= 1, f"meta.{key}", getattr(m, key), "an integer >= 1")
    for key in ("inner_steps", "test_inner_steps"):
        _check(getattr(m, key) >= 0, f"meta.{key}", getattr(m, key), "an integer >= 0")
    _check(m.inner_lr >= 0, "meta.inner_lr", m.inner_lr, "a learning rate >= 0")
    _check(m.meta_lr > 0, "meta.meta_lr", m.meta_lr, "a learning rate > 0")
    _check(m.execution in ("auto", "loop", "vmap"), "meta.execution", m.execution,
           "auto, loop or vmap")
    for section in ("train_attack", "attack"):
        a: AttackConfig = getattr(cfg, section)
        from metarobust.attacks import ATTACKS

        ATTACKS.get(a.name, f"{section}.name")
        _check(a.norm in ("linf", "l2", "l1"), f"{section}.norm", a.norm, "linf, l2 or l1")
        _check(a.eps >= 0 and (a.norm != "linf" or a.eps <= 1), f"{section}.eps", a.eps,
               "a radius >= 0 (not negative) in [0, 1] pixel units; L-inf at most 1, e.g. 0.0314 for 8/255")
        _check(a.restarts >= 1, f"{section}.restarts", a.restarts, "an integer >= 1")
        _check(a.loss in ("ce", "dlr", "cw"), f"{section}.loss", a.loss, "ce, dlr or cw")
        _check(a.target_classes >= 1, f"{section}.target_classes", a.target_classes, "an integer >= 1")
        _check(a.steps >= 1, f"{section}.steps", a.steps, "an integer >= 1")
        _check(a.step_size >= 0, f"{section}.step_size", a.step_size, "a step size >= 0")
    _check(cfg.robust.form in ("trades", "ce"), "robust.form", cfg.robust.form, "trades or ce")
    _check(cfg.robust.weight >= 0, "robust.weight", cfg.robust.weight, "a weight >= 0")
    t = cfg.train
    _check(t.iterations >= 1, "train.iterations", t.iterations, "an integer >= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "an integer >= 1")
    _check(cfg.eval.episodes >= 1, "eval.episodes", cfg.eval.episodes, "an integer >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "an integer >= 1")
    _check(cfg.eval.suite in ("single", "autoattack"), "eval.suite", cfg.eval.suite, "single or autoattack")
    for norm, eps in cfg.eval.union.items():
        _check(norm in ("linf", "l2", "l1") and eps >= 0, f"eval.union.{norm}", eps,
               "norm -> eps with norm in linf, l2, l1 and eps >= 0")
    _check(cfg.eval.check_points >= 1, "eval.check_points", cfg.eval.check_points, "an integer >= 1")
    _check(all(m >= 0 for m in cfg.eval.eps_sweep), "eval.eps_sweep", cfg.eval.eps_sweep,
           "multiples of attack.eps, each >= 0")
