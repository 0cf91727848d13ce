"""Typed experiment configs: dataclasses with the papers' defaults, YAML files, dotted overrides.

A YAML file under ``configs/`` overrides only what differs from these defaults, and the command
line overrides the file::

    metarobust train configs/meta/omniglot_rmaml.yaml meta.train_shots=5 attack.eps=0.0392

The config is a composition of sections. This module holds the sections every run has (data,
model, meta, attacks, train, eval, analysis, at) and imports nothing of the library above it; a
recipe that has settings of its own declares its section where it is defined
(:func:`config_section`, e.g. ``robust`` in ``training/recipes/r_maml.py``, ``mat`` in
``training/recipes/mat.py``), with its checks beside its fields (a ``check()`` method). Names that
only a registry knows (datasets, models, attacks, recipes, estimators) are checked by
:func:`metarobust.experiment.load_config`, which composes, parses and validates a config before
any work starts; a wrong key, type or value raises :class:`~metarobust.errors.ConfigError`
naming the key and what would be accepted.

Defaults follow R-MAML's code on Omniglot (Wang et al., ICLR 2021; ``shared/methods/META.md``
section 2.0/2.3): 5-way, 15 queries per class, meta-batch 4, inner SGD lr 0.01 with 5 steps at
training and 10 at test, Adam meta lr 1e-3, second order, eps 8/255 and PGD-10 with step 2/255
at evaluation, TRADES weight 5 for Omniglot. Epsilons are in [0, 1] pixel units (8/255 = 0.0314).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from metarobust.errors import ConfigError, ConfigWarning
from metarobust.resources import config_path

EPS_8 = 8 / 255
STEP_2 = 2 / 255
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "piecewise", "cosine", "cyclic")
SELECTIONS = ("last", "best")
"""The values of ``at.select``: deploy the last epoch, or the best on the held-out images."""
SELECT_ON = ("auto", "robust", "clean")
"""What ``at.select=best`` ranks epochs by: ``auto`` is ``clean`` for the ``natural`` recipe (a
model trained without an adversary is judged by what it is trained for; its PGD accuracy is
highest when it is barely trained) and ``robust`` for every other recipe."""
def select_metric(recipe: str, select_on: str) -> str:
    """What ``at.select=best`` ranks epochs by for ``recipe``: ``at.select_on`` with ``auto``
    resolved (:data:`SELECT_ON`)."""
    if select_on != "auto":
        return select_on
    return "clean" if recipe == "natural" else "robust"


NORMS = ("linf", "l2", "l1")
"""The threat models (L-inf, L2, L1 balls), in the order attacks and the harness list them."""


@dataclass
class DataConfig:
    """Which dataset, and how its images are prepared."""

    dataset: str = "glyphs"
    """Registry name (``metarobust list datasets``)."""
    root: str | None = None
    """Where the files are (folder or zips); ``None``: ``$METAROBUST_DATA/<dataset>``, else
    ``~/.cache/metarobust/<dataset>``. The embedded ``glyphs`` set needs no files."""
    image_size: int | None = None
    """Side length images are resized to; ``None``: the dataset's standard size (28 for Omniglot,
    glyphs and MNIST, as in Vinyals et al. and MAML; 32 for CIFAR, CIFAR-FS and FC100; 84 for
    miniImageNet). Resolve it with ``metarobust.data.datasets.image_size_of``."""
    rotations: bool = False
    """Omniglot: add each character rotated by 90, 180, 270 degrees as three new classes."""
    download: bool = False
    """Fetch the official files into ``root`` if they are missing (needs internet)."""


@dataclass
class ModelConfig:
    """The network (``metarobust/models/``; docs/models.md)."""

    name: str = "conv4"
    """Registry name (``metarobust list models``): ``conv4``, ``resnet12``, ``preact_resnet18``,
    ``resnet18``, ``wrn34_10``, ``wrn28_10``, ``small_cnn``."""
    hidden: int = 64
    """Base width. 64 is every model's paper size (Conv-4: 64 filters per block, Vinyals et al.,
    Finn et al.; ResNet-12: 64-160-320-640; WRN-34-10: 16-160-320-640); other values scale every
    width by hidden/64."""
    batch_norm: str = "auto"
    """BatchNorm: ``batch`` (per-forward batch statistics at training and test, as MAML),
    ``running`` (standard BN with running statistics), ``none``, or ``auto``: ``batch`` for
    ``conv4`` and ``resnet12`` (meta-learning), ``running`` for the adversarial-training models,
    ``none`` for ``small_cnn``."""
    normalize: str = "auto"
    """Input statistics of the model's first layer: ``auto`` (the model's convention, else the
    dataset's), ``none`` (raw [0, 1], TRADES/MART), ``half`` ((x - 0.5) / 0.5), ``cifar10``,
    ``cifar100``, ``mini_imagenet``, ``imagenet``, ``mnist``, ``fashion_mnist``."""
    drop_rate: float | None = None
    """Dropout rate; ``null``: the model's paper default (``small_cnn`` 0.5 as TRADES, WRN 0,
    ``resnet12`` 0; RFS and MetaOptNet pre-train ResNet-12 with 0.1 and DropBlock)."""


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
    execution: str = "auto"
    """``loop`` (one task at a time), ``vmap`` (all tasks at once), or ``auto`` (by device)."""
    adapt: str = "all"
    """Parameters the inner loop adapts: ``all`` (MAML) or ``head`` (ANIL, Raghu et al. 2020:
    the classifier only; the recipe ``anil`` forces it)."""


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
class IDConfig:
    """The intrinsic-dimension analysis (``metarobust id``; ``docs/intrinsic_dimension.md``).

    Features of the query images are taken per layer after fine-tuning on each frozen test
    episode's support set, clean and under the ``attack`` section's attack, and their intrinsic
    dimension is estimated with error bars from sub-samples (Ansuini et al., NeurIPS 2019).
    """

    layers: list[str] = field(default_factory=list)
    """Module names (as in ``model.named_modules()``) or ``penultimate`` (the head's input);
    empty: each block of the encoder and the penultimate features."""
    estimators: list[str] = field(default_factory=lambda: ["twonn", "mle", "pca"])
    """Estimator names (``twonn``, ``mle``, ``pca``)."""
    points: int = 2000
    """Distinct query images pooled per condition (Ansuini et al.: ~2000). Keep it identical
    across the runs you compare: TwoNN and MLE depend on the sample size."""
    bootstrap: int = 20
    """Sub-samples (without replacement) for the error bars (Ansuini et al.: 20); 0: none."""
    fraction: float = 0.9
    """Share of the points in each sub-sample (Ansuini et al.: 0.9)."""
    twonn_discard: float = 0.1
    """TwoNN: fraction of the largest ratios r2/r1 left out of the fit (Facco et al.: 0.1)."""
    mle_neighbors: int = 20
    """MLE: neighbours k of the Levina-Bickel estimate (MacKay-Ghahramani combination)."""
    pca_variance: float = 0.9
    """PCA: share of the variance the counted components must explain (Ansuini et al.: 0.9)."""


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
class OptimConfig:
    """The optimizer and its learning-rate schedule, for any recipe (``training/optim.py``).

    A field left ``null`` takes the recipe family's paper default: meta-learning recipes Adam at
    1e-3 with a constant rate (MAML, R-MAML), plain recipes SGD at 0.1 with momentum 0.9, weight
    decay 2e-4 and x0.1 at epochs 100 and 150 (Madry et al.'s CIFAR-10 PGD-AT; each config under
    ``configs/at/`` sets its paper's values). Schedules count epochs (a pass over the training
    images; meta-learning: one meta-update) and step before every optimizer step.
    """

    name: str | None = None
    """``adam`` or ``sgd``; ``null``: the recipe's (meta: adam, plain: sgd)."""
    lr: float | None = None
    """Peak learning rate (the cyclic schedule's maximum)."""
    momentum: float | None = None
    """SGD momentum (plain default 0.9); Adam takes none."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    weight_decay: float | None = None
    """L2 weight decay (plain default 2e-4, meta 0)."""
    schedule: str | None = None
    """``constant``, ``piecewise`` (x ``gamma`` at each of ``milestones``), ``cosine`` or ``cyclic``
    (triangular 0 -> lr -> 0, the peak at ``cyclic_peak`` of training; Wong et al.'s fast AT)."""
    milestones: list[float] | None = None
    """Epochs (may be fractional) at which ``piecewise`` multiplies the lr by ``gamma``."""
    gamma: float = 0.1
    cyclic_peak: float = 0.5
    """Where the cyclic schedule peaks, as a fraction of training: 1/2 in Wong et al.'s CIFAR-10
    scripts for Fast and Free AT (``train_fgsm.py``, ``train_free.py``: torch's ``CyclicLR`` with
    equal up and down phases), 2/5 in their MNIST script."""

    def filled(self, defaults: OptimConfig) -> OptimConfig:
        """These settings with every ``null`` field taken from ``defaults``."""
        return dataclasses.replace(self, **{f.name: getattr(defaults, f.name) for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is None})


EVAL_SUITES = ("single", "autoattack", "apgd_ce_t", "autoattack_reference")
"""The values of ``eval.suite`` (``metarobust/evaluation/harness.py`` defines each)."""


@dataclass
class EvalConfig:
    episodes: int = 600
    """Frozen test episodes (``episodes/<dataset>/...``), the same for every method."""
    batch_size: int = 20
    """Episodes evaluated together."""
    manifest: str | None = None
    """A manifest path; ``None``: ``test_<N>way_<K>shot_<Q>query_<E>.json`` shipped in
    ``metarobust/episodes/<dataset>/``, else the user's copy (``metarobust episodes freeze``)."""
    suite: str = "single"
    """The attacks, each on the points the ones before left robust, in ``attack.norm`` at
    ``attack.eps`` (``EVAL_SUITES``): ``single`` (the ``attack`` section alone); ``autoattack``
    (AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square, the reference's settings per
    norm); ``apgd_ce_t`` (AutoAttack's APGD-CE + APGD-T subset; until 0.2 this was ``autoattack``);
    ``autoattack_reference`` (the reference code, ``pip install pyautoattack``)."""
    union: dict[str, float] = field(default_factory=dict)
    """Extra threat models for the union, norm -> eps, e.g. ``{l2: 0.5, l1: 12.0}``: a point is
    robust only if it survives the suite in every threat model (and in ``attack.norm``)."""
    checks: bool = True
    """Run the gradient-masking checks (more steps, large eps, attack vs random noise)."""
    strict: bool = False
    """A failed gradient-masking check is an error (``metarobust eval`` exits with code 3, after
    ``eval.json`` is written) instead of a warning. Needs ``eval.checks``."""
    check_points: int = 200
    """Query points (or test images) the checks and the eps sweep use."""
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    """Multiples of ``attack.eps`` for the robust-accuracy-vs-eps plot."""
    points: int = 0
    """Standard (plain-classifier) runs: test images evaluated, a fixed seeded random subset of the
    test split (the same for every run; test splits are stored class by class); 0: all."""


@dataclass
class StandardTrainingConfig:
    """Standard (single-task) adversarial training: the ``at`` section, read when ``recipe`` is a
    standard recipe (``natural``, ``pgd_at``, ``trades``, ...; ``metarobust list recipes``).

    Defaults are Madry et al.'s CIFAR-10 PGD-AT settings (``MadryLab/cifar10_challenge``:
    batch 128, SGD momentum 0.9, weight decay 2e-4, lr 0.1 decayed x0.1 at ~100 and ~150 of
    ~200 epochs); each recipe's config under ``configs/at/`` sets its paper's values. The training
    attack is the ``train_attack`` section. Schedules step every iteration (optimizer step).
    """

    batch_size: int = 128
    epochs: int = 200
    """Passes over the training images (Free AT: each batch is replayed ``replays`` times per pass)."""
    amp: str = "none"
    """Mixed precision: ``none``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler)."""
    channels_last: bool = False
    """Model and batches in channels-last memory format (faster convolutions on recent GPUs)."""
    compile: str = "auto"
    """``torch.compile`` the models and the attack's step update: ``on``, ``off`` (eager, the
    reference) or ``auto``: compiled where ``metarobust.compilation.MEASURED`` measured it faster
    for this device kind and model family and the run is long enough to pay the compilation back
    (``true``/``false``, the 0.2 booleans, mean ``on``/``off``). Meta recipes stay eager."""
    attack_bn: str = "auto"
    """BatchNorm mode while the training attack runs: ``train``, ``eval`` or ``auto`` (the
    recipe's reference code: eval for TRADES/MART/Backward Smoothing, train for the others)."""
    augment: str = "auto"
    """Device-side augmentation: ``auto`` (random crop with 4-pixel padding + horizontal flip for
    3-channel images of side >= 32, none otherwise), ``none``, or a name of
    ``metarobust.data.augment.AUGMENTATIONS`` (``crop_flip``, ``flip``)."""
    train_size: int = 0
    """Train on the first ``train_size`` images of a seeded permutation (0: all); for tests and
    CPU-sized runs."""
    holdout: int = 0
    """Images of the train split held out as a validation set (fast AT's early-stop check, FRL's
    validation, ``select=best``; 0: none, fast AT's check then uses the epoch's first training
    batch as in Wong et al.)."""
    select: str = "last"
    """Which epoch's weights the run deploys: ``last`` (the end of training), or ``best``: after
    every epoch the model (eval mode) is scored under PGD-10 (the ``attack`` section's norm, eps
    and step size) on the ``holdout`` images, and the epoch with the highest robust accuracy is
    written to ``checkpoints/best.pt``, evaluated at the end and by ``metarobust eval`` (Rice et
    al. 2020's early stopping against robust overfitting; needs ``holdout`` > 0)."""
    select_on: str = "auto"
    """What ``select=best`` ranks the epochs by on the held-out images: ``robust`` (PGD-10
    accuracy, Rice et al.'s early stopping), ``clean``, or ``auto`` (``clean`` for the ``natural``
    recipe, ``robust`` otherwise)."""
    beta: float = 6.0
    """Weight of the robust KL term (TRADES, MART: 6; Backward Smoothing's README: 10)."""
    replays: int = 8
    """Free AT: replays of each mini-batch (m)."""
    early_stop: bool = True
    """Fast AT: stop and restore the previous epoch's weights when the PGD accuracy of the check
    batch drops by more than ``early_stop_drop`` (catastrophic overfitting)."""
    early_stop_drop: float = 0.2
    smoothing_gamma: float = 1.0
    """Backward Smoothing: scale of the uniform output-space noise (gamma)."""
    init: str | None = None
    """Fine-tune: a run folder or ``.pt`` checkpoint whose ``model`` weights initialise the
    trained model (FRL's hot start, Hou et al.'s f_0); ``None``: random initialisation."""


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
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule (null fields: the recipe's defaults)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: IDConfig = field(default_factory=IDConfig)
    """Intrinsic-dimension analysis (``metarobust id``)."""
    at: StandardTrainingConfig = field(default_factory=StandardTrainingConfig)
    """Standard adversarial training (single-task recipes); ignored by meta-learning recipes."""



_SECTIONS: dict[str, type] = {}
"""Sections declared by the code that owns them (:func:`config_section`), by config key."""


def config_section(name: str) -> Callable[[type], type]:
    """Declare a dataclass as the config section ``name`` (``cfg.<name>``, ``<name>.<field>=...``
    on the command line), owned by the module that defines it. Its optional ``check()`` method
    validates its fields (raise :class:`ConfigError` naming ``<name>.<field>``).

    Example:
        >>> @config_section("mat")
        ... @dataclass
        ... class MATConfig:
        ...     peers: int = 2
        ...     def check(self) -> None:
        ...         check_value(self.peers >= 2, "mat.peers", self.peers, "an integer >= 2")
    """

    def decorator(cls: type) -> type:
        core = {f.name for f in dataclasses.fields(ExperimentConfig)}
        if name in core or _SECTIONS.get(name, cls) is not cls:
            raise ValueError(f"config section {name!r} is declared twice")
        _SECTIONS[name] = cls
        return cls

    return decorator


def experiment_schema() -> type:
    """:class:`ExperimentConfig` with every declared section added as a field (a dataclass)."""
    extra = [(name, cls, field(default_factory=cls)) for name, cls in sorted(_SECTIONS.items())]
    return dataclasses.make_dataclass("ExperimentConfig", extra, bases=(ExperimentConfig,))


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides, typed and with each
    section's own checks. The registry checks come on top in
    :func:`metarobust.experiment.load_config`, which every command uses.

    A file that sets nothing (empty, or only comments) runs every default (R-MAML on the embedded
    glyphs for 15,000 meta-updates): it is accepted with a :class:`~metarobust.errors.ConfigWarning`.
    """
    layers = [] if path is None else [_read_yaml(path)]
    return _merge(layers + _override_layers(overrides))


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a nested dict (e.g. one saved in a checkpoint), then
    ``key=value`` overrides, typed and section-checked exactly as :func:`parse_config` checks a
    file and its overrides."""
    _check_sections(values, "the saved config")
    return _merge([values, *_override_layers(overrides)])


def _read_yaml(config: str | Path) -> Any:
    """The mapping a config file (a path or a shipped name) holds; a folder, a list, a scalar or
    invalid YAML is a ConfigError."""
    import yaml

    if Path(config).expanduser().is_dir():
        raise ConfigError(f"config file {str(config)!r} is a folder; give a YAML file or a shipped config name "
                          f"such as meta/omniglot_maml.yaml (metarobust list configs)")
    path = config_path(config)  # a YAML file, or a shipped name such as meta/omniglot_maml.yaml
    try:
        raw = yaml.safe_load(path.read_text())
    except Exception as exc:  # yaml.YAMLError, a decoding error and friends
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {_kind(raw)} ({_short(raw)}); a config is a "
                          f"mapping of sections and keys, e.g. `recipe: maml` then `meta:` with `ways: 5` "
                          f"indented below it (see the shipped quickstart.yaml)")
    try:  # OmegaConf's own loader: it reads 1e-3 as a number, where plain YAML 1.1 reads a string
        layer = OmegaConf.load(path) if raw else OmegaConf.create({})
    except Exception as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not raw:
        defaults = ExperimentConfig()
        warnings.warn(
            f"config file {str(path)!r} sets nothing (it is empty or holds only comments): EVERY DEFAULT "
            f"APPLIES, i.e. recipe {defaults.recipe} on dataset {defaults.data.dataset} with model "
            f"{defaults.model.name} for {defaults.train.iterations:,} meta-updates (train.iterations; plain "
            f"recipes: {defaults.at.epochs} epochs, at.epochs), unless the command line overrides them. Start "
            f"from a shipped config (metarobust list configs) if this is not what you meant",
            ConfigWarning, stacklevel=3)
    _check_sections(OmegaConf.to_container(layer), f"config file {str(path)!r}")
    return layer


def _override_layers(overrides: list[str] | None) -> list[Any]:
    """One OmegaConf layer per ``key=value`` argument, each checked for its shape."""
    layers = []
    for item in overrides or []:
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. meta.train_shots=5")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r} cannot be parsed ({str(exc).splitlines()[0]}); write "
                              f"key=value, e.g. meta.train_shots=5 or eval.eps_sweep=[0,1,2]") from None
        _check_sections(OmegaConf.to_container(layer), f"override {item!r}")
        layers.append(layer)
    return layers


def _check_sections(values: Any, source: str, cls: type | None = None, prefix: str = "") -> None:
    """Refuse a section given a plain value (``meta=5``, ``meta: 5``, a list), naming the section
    and its fields; unknown keys and wrong types of plain fields are left to the merge's message."""
    cls = cls or experiment_schema()
    if not isinstance(values, dict):
        return
    hints = _hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            continue
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            _check_sections(value, source, hint, full + ".")
            continue
        fields = [f.name for f in dataclasses.fields(hint)]
        raise ConfigError(f"{source}: {full!r} is a config section, not a value (given {_short(value)}); set "
                          f"its fields one by one, e.g. {full}.{fields[0]}=..., or in YAML as a mapping "
                          f"below `{full}:`; its fields: {fields}")


def _hints(cls: type) -> dict[str, Any]:
    """The resolved type of each field of the dataclass ``cls`` (annotations are strings here)."""
    return typing.get_type_hints(cls)


def _kind(value: Any) -> str:
    return {list: "list", dict: "mapping", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _merge(layers: list[Any]) -> ExperimentConfig:
    try:
        merged = OmegaConf.structured(experiment_schema())
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ConfigError(_unknown_key_message(exc)) from None
    except ValidationError as exc:
        raise ConfigError(_wrong_type_message(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    assert isinstance(cfg, ExperimentConfig)
    check_fields(cfg)
    return cfg


def _wrong_type_message(exc: ValidationError) -> str:
    """``<key>=<value> is invalid; expected <the field's type>, e.g. <key>=<its default>``."""
    if not exc.full_key:  # OmegaConf gives no key (a shape _check_sections did not foresee)
        return f"invalid config value ({(exc.msg or str(exc) or type(exc).__name__).splitlines()[0]})"
    value = exc.value
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    key = re.sub(r"\[\d+\]$", "", exc.full_key)  # eval.eps_sweep[0]: an element of a list field
    found = _field(key)
    if found is None:
        return (f"{exc.full_key}={_short(value)} is invalid: {(exc.msg or '').splitlines()[0]}; give a value "
                f"of the field's type (see metarobust/config.py or the section's recipe)")
    hint, default = found
    return (f"{exc.full_key}={_short(value)} is invalid; expected {_describe_type(hint)}, e.g. "
            f"{key}={_yaml_value(default)} (its default)")


def _field(full_key: str) -> tuple[Any, Any] | None:
    """The type and default of the field at the dotted ``full_key`` (``None`` if not a field)."""
    cls: Any = experiment_schema()
    parts = full_key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        f, hint = fields[part], _hints(cls)[part]
        if i == len(parts) - 1:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            return hint, default
        cls = hint
    return None


def _describe_type(hint: Any) -> str:
    """``int`` -> "an integer", ``float | None`` -> "a number, or null", ``list[str]`` -> ...."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{_describe_type(rest[0])}, or null"
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_describe_type(args[0]).split(' ', 1)[1]}s in brackets"
    if origin is dict:
        return "a mapping in braces, {key: value, ...}"
    return {int: "an integer", float: "a number", bool: "a boolean (true or false)",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


MOVED = {**{f"at.{name}": name for name in ("mat", "ltd", "advprop", "finetune", "local_balls", "bat", "frl")},
         **{f"at.{name}": f"optim.{name}" for name in ("lr", "momentum", "nesterov", "weight_decay", "schedule",
                                                        "milestones", "gamma", "cyclic_peak")},
         "meta.meta_lr": "optim.lr", "model.norm": "model.batch_norm"}
"""Sections that moved in 0.2 (old key prefix -> new), for the unknown-key message."""


def _unknown_key_message(exc: ConfigKeyError) -> str:
    full_key = exc.full_key or str(exc.key)
    for old, new in MOVED.items():
        if full_key == old or full_key.startswith(old + "."):
            return (f"unknown config key {full_key!r}: it moved in metarobust 0.2; write "
                    f"{new + full_key[len(old):]!r} instead")
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    section: Any = experiment_schema()
    for part in parent.split(".") if parent else []:
        fields = {f.name: f for f in dataclasses.fields(section)}
        if part not in fields:
            break
        section = type(fields[part].default_factory())  # type: ignore[misc]
    known = [f.name for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
    close = difflib.get_close_matches(str(exc.key), known, n=1)
    hint = f"did you mean {(parent + '.' if parent else '') + close[0]!r}? " if close else ""
    return f"unknown config key {full_key!r}; {hint}valid keys here: {known}"


def check_value(condition: bool, key: str, value: Any, accepted: str) -> None:
    """Raise :class:`ConfigError` ``"<key>=<value> is invalid; expected <accepted>"`` unless
    ``condition``."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid; expected {accepted}")


_check = check_value


def check_output_path(key: str, path: str | Path, kind: str = "file") -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: for ``kind="folder"``
    an existing file (or a file where a parent folder must go), for ``kind="file"`` an existing
    folder; and a place the user may not write. ``key`` names where the path came from
    (``out_dir``, ``--out-dir``, ``RUN``)."""
    path = Path(path).expanduser()
    if kind == "folder":
        _check(not path.exists() or path.is_dir(), key, str(path),
               "a folder (created if missing), not an existing file")
    else:
        _check(not path.is_dir(), key, str(path), f"a file path to write, not a folder; move the folder "
                                                   f"{str(path)!r} away")
    existing = path if kind == "folder" else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check(existing.is_dir(), key, str(path), f"a path whose parent folders can be made, but {str(existing)!r} "
                                              f"is a file")
    _check(os.access(existing, os.W_OK | os.X_OK), key, str(path), f"a place you may write: folder "
                                                                   f"{str(existing)!r} is not writable")
    _check(kind == "folder" or not path.exists() or os.access(path, os.W_OK), key, str(path),
           "a file you may write: it exists and is read-only")


def check_fields(cfg: ExperimentConfig) -> None:
    """The checks every section can make on its own fields (no registry needed); then the
    declared sections' ``check()``."""
    _check(cfg.device == "auto" or re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", cfg.device) is not None,
           "device", cfg.device, "auto, cpu, cuda or cuda:<index>")
    _check(cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size",
           cfg.data.image_size, "an integer >= 8, or null for the dataset's standard size")
    _check(cfg.model.hidden >= 1, "model.hidden", cfg.model.hidden, "a positive integer")
    _check(cfg.model.batch_norm in ("auto", "batch", "running", "none"), "model.batch_norm", cfg.model.batch_norm,
           "auto, batch (per-batch statistics), running (standard BN) or none")
    _check(cfg.model.drop_rate is None or 0 <= cfg.model.drop_rate < 1, "model.drop_rate",
           cfg.model.drop_rate, "a rate in [0, 1), or null for the model's default")
    m = cfg.meta
    _check(m.ways >= 2, "meta.ways", m.ways, "an integer >= 2")
    for key in ("train_shots", "test_shots", "queries", "meta_batch_size"):
        _check(getattr(m, key) >= 1, f"meta.{key}", getattr(m, key), "an integer >= 1")
    for key in ("inner_steps", "test_inner_steps"):
        _check(getattr(m, key) >= 0, f"meta.{key}", getattr(m, key), "an integer >= 0")
    _check(m.inner_lr >= 0, "meta.inner_lr", m.inner_lr, "a learning rate >= 0")
    _check(m.execution in ("auto", "loop", "vmap"), "meta.execution", m.execution, "auto, loop or vmap")
    _check(m.adapt in ("all", "head"), "meta.adapt", m.adapt, "all (MAML) or head (ANIL)")
    for section in ("train_attack", "attack"):
        a: AttackConfig = getattr(cfg, section)
        _check(a.norm in NORMS, f"{section}.norm", a.norm, "linf, l2 or l1")
        _check(a.eps >= 0 and (a.norm != "linf" or a.eps <= 1), f"{section}.eps", a.eps,
               "a radius >= 0 (not negative) in [0, 1] pixel units; L-inf at most 1, e.g. 0.0314 for 8/255")
        _check(a.restarts >= 1, f"{section}.restarts", a.restarts, "an integer >= 1")
        _check(a.loss in ("ce", "dlr", "cw"), f"{section}.loss", a.loss, "ce, dlr or cw")
        _check(a.target_classes >= 1, f"{section}.target_classes", a.target_classes, "an integer >= 1")
        _check(a.steps >= 1, f"{section}.steps", a.steps, "an integer >= 1")
        _check(a.step_size >= 0, f"{section}.step_size", a.step_size, "a step size >= 0")
    t = cfg.train
    _check(t.iterations >= 1, "train.iterations", t.iterations, "an integer >= 1")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "an integer >= 1")
    e = cfg.eval
    _check(e.episodes >= 1, "eval.episodes", e.episodes, "an integer >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    _check(e.suite in EVAL_SUITES, "eval.suite", e.suite, ", ".join(EVAL_SUITES))
    for norm, eps in e.union.items():
        _check(norm in NORMS and eps >= 0, f"eval.union.{norm}", eps,
               "norm -> eps with norm in linf, l2, l1 and eps >= 0")
    _check(e.check_points >= 1, "eval.check_points", e.check_points, "an integer >= 1")
    _check(e.checks or not e.strict, "eval.strict", e.strict, "false when eval.checks=false (there is nothing "
           "to be strict about), or set eval.checks=true")
    _check(all(x >= 0 for x in e.eps_sweep), "eval.eps_sweep", e.eps_sweep, "multiples of attack.eps, each >= 0")
    _check(e.points >= 0, "eval.points", e.points, "an integer >= 0 (0: the whole test split)")
    a = cfg.analysis
    _check(len(a.estimators) >= 1, "analysis.estimators", list(a.estimators),
           "a non-empty list of estimator names (twonn, mle, pca)")
    _check(a.points >= 3, "analysis.points", a.points, "an integer >= 3 (e.g. 2000, as Ansuini et al.)")
    _check(a.bootstrap >= 0, "analysis.bootstrap", a.bootstrap, "an integer >= 0 (0: no error bars)")
    _check(0 < a.fraction <= 1, "analysis.fraction", a.fraction, "a share of the points in (0, 1], e.g. 0.9")
    _check(0 <= a.twonn_discard < 1, "analysis.twonn_discard", a.twonn_discard, "a fraction in [0, 1), e.g. 0.1")
    _check(a.mle_neighbors >= 2, "analysis.mle_neighbors", a.mle_neighbors, "an integer >= 2, e.g. 20")
    _check(0 < a.pca_variance <= 1, "analysis.pca_variance", a.pca_variance, "a share of variance in (0, 1]")
    _check_at(cfg.at)
    _check_optim(cfg.optim)
    for name in _SECTIONS:
        section = getattr(cfg, name, None)
        if section is not None and hasattr(section, "check"):
            section.check()


def _check_optim(o: OptimConfig) -> None:
    """The ``optim`` section's own fields (the combination with the recipe's defaults and the run's
    length is checked by :func:`metarobust.training.optim.resolve_optim` before any work)."""
    _check(o.name in (None, *OPTIMIZERS), "optim.name", o.name, f"one of {list(OPTIMIZERS)}, or null")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "a learning rate > 0")
    _check(o.momentum is None or 0 <= o.momentum < 1, "optim.momentum", o.momentum, "a momentum in [0, 1)")
    _check(o.weight_decay is None or o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a weight decay >= 0")
    _check(o.schedule in (None, *SCHEDULES), "optim.schedule", o.schedule, f"one of {list(SCHEDULES)}, or null")
    _check(o.milestones is None or list(o.milestones) == sorted(o.milestones) and all(m > 0 for m in o.milestones),
           "optim.milestones", o.milestones, "increasing epochs > 0")
    _check(0 < o.gamma <= 1, "optim.gamma", o.gamma, "a decay factor in (0, 1]")
    _check(0 < o.cyclic_peak < 1, "optim.cyclic_peak", o.cyclic_peak, "a fraction of training in (0, 1)")


def _check_at(at: StandardTrainingConfig) -> None:
    """The ``at`` section (checked for every recipe: a bad value fails before any work)."""
    _check(at.batch_size >= 1, "at.batch_size", at.batch_size, "an integer >= 1")
    _check(at.epochs >= 1, "at.epochs", at.epochs, "an integer >= 1")
    _check(at.amp in ("none", "bf16", "fp16"), "at.amp", at.amp, "none, bf16 or fp16")
    _check(at.attack_bn in ("auto", "train", "eval"), "at.attack_bn", at.attack_bn, "auto, train or eval")
    compile_ = {"true": "on", "false": "off"}.get(str(at.compile).lower(), str(at.compile).lower())
    _check(compile_ in ("auto", "on", "off"), "at.compile", at.compile, "auto, on or off (true/false mean on/off)")
    at.compile = compile_  # the 0.2 booleans, migrated
    if at.init is not None:
        init = Path(at.init)
        _check((init / "checkpoints" / "last.pt").is_file() if init.is_dir() else init.is_file(), "at.init", at.init,
               "a run folder holding checkpoints/last.pt, or a .pt checkpoint file")
    _check(at.train_size >= 0, "at.train_size", at.train_size, "an integer >= 0 (0: all images)")
    _check(at.holdout >= 0, "at.holdout", at.holdout, "an integer >= 0 (0: no held-out images)")
    _check(at.select in SELECTIONS, "at.select", at.select,
           "last (the final epoch) or best (the best epoch on the at.holdout images)")
    _check(at.select_on in SELECT_ON, "at.select_on", at.select_on,
           "auto (clean for natural, robust otherwise), robust (PGD-10 on the holdout) or clean")
    _check(at.select != "best" or at.holdout > 0, "at.select", at.select,
           "last, or best together with held-out images to select on: set at.holdout=1000 (at.holdout is 0; "
           "never select on the test set)")
    _check(at.beta >= 0, "at.beta", at.beta, "a weight >= 0")
    _check(at.replays >= 1, "at.replays", at.replays, "an integer >= 1 (Free AT's m, e.g. 8)")
    _check(0 < at.early_stop_drop <= 1, "at.early_stop_drop", at.early_stop_drop,
           "an accuracy drop in (0, 1], e.g. 0.2")
    _check(at.smoothing_gamma >= 0, "at.smoothing_gamma", at.smoothing_gamma, "a noise scale >= 0")


__all__ = ["EPS_8", "NORMS", "OPTIMIZERS", "SCHEDULES", "SELECTIONS", "STEP_2", "OptimConfig", "AttackConfig", "DataConfig", "EvalConfig", "ExperimentConfig", "IDConfig",
           "MetaConfig", "ModelConfig", "StandardTrainingConfig", "TrainConfig", "check_fields",
           "check_output_path", "check_value",
           "config_from_dict", "config_section", "experiment_schema", "parse_config", "to_dict", "to_yaml"]
