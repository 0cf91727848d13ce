"""How the ``model`` section of a config becomes constructor arguments.

Every model reads the same few options (``metarobust/config.py``, :class:`ModelConfig`):

- ``model.hidden``: the base width. 64 builds every model at its paper's size (Conv-4: 64
  filters; ResNet-12: 64-160-320-640; ResNet-18 / PreAct-ResNet-18: 64-512; WRN-34-10:
  16-160-320-640; small CNN: 32-64); other values scale every width by ``hidden / 64``
  (:func:`scale_width`), so tests can build a tiny network of the same shape.
- ``model.batch_norm``: ``batch`` / ``running`` / ``none`` (see :func:`metarobust.models.layers.norm2d`),
  or ``auto``: the model's convention (:func:`resolve_batch_norm`).
- ``model.normalize``: the input statistics of the model's first layer (:func:`input_stats`).
- ``model.drop_rate``: dropout / DropBlock rate, ``None`` for the model's paper default.

Example:
    >>> input_stats("auto", in_channels=3, dataset="cifar100")
    ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])
"""

from __future__ import annotations

from metarobust.errors import ConfigError
from metarobust.models.layers import BATCH_NORMS

PAPER_WIDTH = 64
"""``model.hidden`` at which every model has its published size."""

INPUT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # name: (mean, std) per channel; one value is broadcast over the channels.
    "none": ((0.0,), (1.0,)),  # raw [0, 1] pixels, as TRADES' and MART's code feed their models
    "half": ((0.5,), (0.5,)),  # [-1, 1], the few-shot (MAML) convention and Conv-4's default
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),  # Wong et al. / Rice et al.
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # also CIFAR-FS, FC100 (RFS)
    "mini_imagenet": ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
                      (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)),  # RFS, MetaOptNet
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
"""``model.normalize`` choices besides ``auto``."""

NORMALIZE_CHOICES = ("auto", *INPUT_STATS)

# Dataset name (prefix, after lower-casing and "-" -> "_") -> the statistics ``auto`` uses.
# Longest prefixes first: "cifar100" before "cifar10", "fashion" before "mnist".
_DATASET_STATS = (
    ("cifar100", "cifar100"), ("cifar_fs", "cifar100"), ("cifarfs", "cifar100"),
    ("fc100", "cifar100"), ("cifar10", "cifar10"), ("fashion", "fashion_mnist"),
    ("mnist", "mnist"), ("mini", "mini_imagenet"), ("tiered", "mini_imagenet"),
    ("imagenet", "imagenet"), ("omniglot", "half"), ("glyphs", "half"),
)


def input_stats(normalize: str, in_channels: int, dataset: str | None = None,
                default: str | None = None, fallback: str | None = None
                ) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for the model's :class:`~metarobust.models.layers.Normalize`.

    Args:
        normalize: ``model.normalize``: a name of :data:`INPUT_STATS`, or ``auto``.
        in_channels: channels of the input images.
        dataset: ``data.dataset`` when the caller knows it (``auto`` then picks its statistics).
        default: the model's own convention, which ``auto`` takes first (Conv-4: ``half``;
            the TRADES small CNN: ``none``); ``None`` when the model follows the dataset.
        fallback: what ``auto`` takes when the dataset is unknown (ResNet-12:
            ``mini_imagenet``); ``None``: CIFAR-10's for 3-channel images, ``half`` for others.

    ``auto`` resolves to ``default``, else the dataset's statistics, else ``fallback``, else
    CIFAR-10's for 3-channel images and ``half`` for others.

    Raises:
        ConfigError: unknown name, or statistics for another number of channels.
    """
    name = normalize
    if normalize == "auto":
        name = (default or _dataset_stats(dataset) or fallback
                or ("cifar10" if in_channels == 3 else "half"))
    if name not in INPUT_STATS:
        raise ConfigError(f"model.normalize={normalize!r} is invalid; expected one of "
                          f"{list(NORMALIZE_CHOICES)}")
    mean, std = INPUT_STATS[name]
    if len(mean) == 1:
        mean, std = mean * in_channels, std * in_channels
    if len(mean) != in_channels:
        raise ConfigError(
            f"model.normalize={name!r} has statistics for {len(mean)} channels but the images have "
            f"{in_channels}; use one of {[k for k, (m, _) in INPUT_STATS.items() if len(m) in (1, in_channels)]}")
    return list(mean), list(std)


def _dataset_stats(dataset: str | None) -> str | None:
    if not dataset:
        return None
    key = dataset.lower().replace("-", "_")
    return next((stats for prefix, stats in _DATASET_STATS if key.startswith(prefix)), None)


def resolve_batch_norm(batch_norm: str, default: str) -> str:
    """``model.batch_norm`` with ``auto`` replaced by the model's convention ``default``."""
    kind = default if batch_norm == "auto" else batch_norm
    if kind not in BATCH_NORMS:
        raise ConfigError(f"model.batch_norm={batch_norm!r} is invalid; expected auto or one of {list(BATCH_NORMS)}")
    return kind


def resolve_drop_rate(drop_rate: float | None, default: float) -> float:
    """``model.drop_rate`` with ``None`` replaced by the model's paper default."""
    rate = default if drop_rate is None else float(drop_rate)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.drop_rate={drop_rate!r} is invalid; expected a rate in [0, 1) "
                          f"(or null for the model's default)")
    return rate


def scale_width(channels: int, hidden: int) -> int:
    """``channels`` (a paper width) scaled by ``hidden / 64``, at least 1."""
    if hidden < 1:
        raise ConfigError(f"model.hidden={hidden!r} is invalid; expected a positive integer "
                          f"({PAPER_WIDTH} builds the paper's size)")
    return max(1, round(channels * hidden / PAPER_WIDTH))


def require_image_size(model: str, image_size: int, minimum: int, why: str) -> None:
    """Raise :class:`ConfigError` when ``image_size`` is below what ``model`` can take."""
    if image_size < minimum:
        raise ConfigError(
            f"data.image_size={image_size} is too small for model {model!r}: it needs at least "
            f"{minimum} ({why}); set data.image_size>={minimum}")


def require_no_dropout(model: str, drop_rate: float | None) -> None:
    """Models without dropout refuse a ``model.drop_rate`` rather than ignore it."""
    if drop_rate:
        raise ConfigError(f"model.drop_rate={drop_rate!r} is not supported by model {model!r} "
                          f"(its reference code has no dropout); leave it null")
