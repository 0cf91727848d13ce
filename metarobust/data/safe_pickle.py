"""Reading dataset pickles without running code from them.

CIFAR's official python batches and the miniImageNet pickle caches are Python pickles: dicts of
numpy arrays, lists and strings. ``pickle.load`` (which torchvision uses) runs whatever callable
a file names, so a tampered download could execute code. :func:`load_pickle` accepts only the
constructors those files need (numpy arrays, dtypes and scalars, and bytes), and turns every
failure into a :class:`~metarobust.errors.DataError` that names the file.

Example:
    >>> with open("cifar-10-batches-py/test_batch", "rb") as f:
    ...     batch = load_pickle(f, "cifar-10-batches-py/test_batch")
    >>> batch["data"].shape
    (10000, 3072)
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

from metarobust.errors import DataError

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # numpy arrays, dtypes and scalars, under numpy 1.x and 2.x module names
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # bytes pickled by Python 3 with protocol 2 (numpy array buffers among them)
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
})
"""``(module, name)`` pairs a dataset pickle may reference; anything else is refused."""


class _DatasetUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a dataset type)")
        return super().find_class(module, name)


def load_pickle(source: IO[bytes] | bytes, where: str) -> Any:
    """Unpickle a dataset file (``latin1`` strings, as Python 2 pickles of numpy need).

    Args:
        source: an open binary file or the file's bytes.
        where: the file's name, for messages.

    Raises:
        DataError: the file is truncated, is not a pickle, or references a type that a dataset
            pickle never holds.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return _DatasetUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OSError, MemoryError) as err:
        raise DataError(
            f"{where} cannot be read as a dataset pickle ({type(err).__name__}: {err}); the file "
            f"is corrupt, truncated or not the official one: replace it"
        ) from err
