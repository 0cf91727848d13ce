"""Every dataset reader of metarobust, registered in :data:`DATASETS` on import.

The registry and the helpers readers share live in :mod:`metarobust.data.catalog` (readers import
it; this module imports the readers), so a config's ``data.dataset`` name becomes an
:class:`~metarobust.data.store.ImageStore` per split with :func:`load_split`.

Example:
    >>> from metarobust.config import DataConfig
    >>> store = load_split(DataConfig(dataset="glyphs"), "test")
    >>> store.images.shape  # uint8 [M, 1, 28, 28]
"""

from metarobust.data import cifar, cifar_fs, glyphs, image_folder, mini_imagenet, mnist, omniglot  # noqa: F401  (register)
from metarobust.data.catalog import (
    DATASETS,
    SPLITS,
    SPLITS_DIR,
    check_image_size,
    check_split,
    dataset_info,
    dataset_root,
    image_size_of,
    load_split,
    read_split_file,
    split_file_path,
)

__all__ = ["DATASETS", "SPLITS", "SPLITS_DIR", "check_image_size", "check_split", "dataset_info", "dataset_root",
           "image_size_of", "load_split", "read_split_file", "split_file_path"]
