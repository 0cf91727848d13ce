"""Image files to uint8 tensors: batched decoding, resizing, and a cache of decoded splits.

Readers of image trees (CIFAR as JPEG folders or tarballs, miniImageNet's ``images/``) hand
their files' bytes to :func:`decode_images`, which decodes JPEGs in one batched
``torchvision.io.decode_jpeg`` call (about 4x faster than PIL one by one on 32x32 images, and
bit-identical to it on the staged CIFAR-10 JPEGs), and other formats with
``torchvision.io.decode_image``. torchvision deprecated these decoders in 0.29 in favour of
TorchCodec; their warning is silenced here, and PIL takes over where they are gone. Decoding 60,000
CIFAR JPEGs still takes seconds, so readers keep the decoded tensors in a cache
(:func:`cached_tensors`): one ``.pt`` file per source and split under :func:`cache_dir`,
loaded with ``torch.load(weights_only=True)`` and rebuilt when the source changes.

Example:
    >>> images = decode_images([open("a.jpg", "rb").read()], ["a.jpg"], size=32)
    >>> images.shape, images.dtype
    (torch.Size([1, 3, 32, 32]), torch.uint8)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from metarobust.errors import DataError

try:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:  # a torchvision after the deprecation (0.29) removed them: PIL decodes
    decode_image = decode_jpeg = None  # type: ignore[assignment]

CACHE_VERSION = 1
"""Part of every cache key: bump it when a reader's output changes, so old caches are ignored."""

_JPEG_MAGIC = b"\xff\xd8\xff"


def cache_dir() -> Path:
    """Where decoded tensors are cached: ``$METAROBUST_CACHE``, else
    ``~/.cache/metarobust/decoded``. Never inside a dataset root (it may be read-only)."""
    env = os.environ.get("METAROBUST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metarobust" / "decoded"


def source_key(*parts: object, files: Sequence[Path] = ()) -> str:
    """A short hash of ``parts`` and of each file's resolved path, size and mtime, so that a
    replaced file gets a new cache entry."""
    stamp = []
    for path in files:
        st = path.stat()
        stamp.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([CACHE_VERSION, [str(p) for p in parts], stamp], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_tensors(name: str, key: str, build: Callable[[], dict[str, torch.Tensor]],
                   use_cache: bool = True) -> dict[str, torch.Tensor]:
    """``build()``'s tensors, from ``<cache_dir>/<name>-<key>.pt`` when present.

    The file is written atomically (temporary name, then rename); a cache that cannot be written
    (read-only home) or read (corrupt) is skipped with no error: it only saves time.
    """
    if not use_cache:
        return build()
    path = cache_dir() / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
            path.unlink(missing_ok=True)
    tensors = build()
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, part)
        part.replace(path)
    except (OSError, RuntimeError):  # read-only or full disk: run without the cache
        part.unlink(missing_ok=True)
    return tensors


def decode_images(blobs: Sequence[bytes], where: Sequence[str], size: int | None,
                  channels: int = 3) -> torch.Tensor:
    """Decode encoded images (JPEG, PNG, ...) to uint8 ``[M, channels, S, S]``.

    Args:
        blobs: the files' bytes.
        where: a name per file, for the error message.
        size: side ``S`` to resize to (antialiased bilinear, as ``transforms.Resize``); ``None``:
            keep the decoded size, which must then be the same for every image.
        channels: 3 (RGB) or 1 (grayscale); other modes are converted.

    Raises:
        DataError: a file cannot be decoded (named), or sizes differ and ``size`` is ``None``.
    """
    if not blobs:
        side = size or 1
        return torch.empty(0, channels, side, side, dtype=torch.uint8)
    if decode_jpeg is None:
        decoded = [_decode_pil(b, channels, w) for b, w in zip(blobs, where)]
    else:
        decoded = _decode_torchvision(blobs, where, channels)
    shapes = {tuple(t.shape[-2:]) for t in decoded}
    if size is None:
        if len(shapes) > 1:
            raise DataError(f"images of different sizes {sorted(shapes)[:3]} (e.g. {where[0]}); "
                            f"set data.image_size to resize them")
        return torch.stack(decoded)
    if shapes == {(size, size)}:
        return torch.stack(decoded)
    return torch.cat([resize(t.unsqueeze(0), size) for t in decoded])


def _decode_torchvision(blobs: Sequence[bytes], where: Sequence[str], channels: int) -> list[torch.Tensor]:
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
        try:
            if all(bytes(b[:3]) == _JPEG_MAGIC for b in blobs):
                return list(decode_jpeg(data, mode=mode))
            return [decode_image(d, mode=mode) for d in data]
        except RuntimeError:
            pass
    return [_decode_pil(b, channels, w) for b, w in zip(blobs, where)]  # names the bad file


def _decode_pil(blob: bytes, channels: int, where: str) -> torch.Tensor:
    """One image as uint8 ``[channels, H, W]`` with PIL; :class:`DataError` naming ``where``."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode {where} as an image ({err}); the file is corrupt: "
                        f"replace it with the original") from err
    array = array if array.ndim == 3 else array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``[M, C, H, W]`` to uint8 ``[M, C, size, size]`` (antialiased bilinear, rounded),
    in chunks so that the float copy stays small."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
