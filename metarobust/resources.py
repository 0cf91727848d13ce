"""Files that ship inside the package: the experiment configs and the frozen episodes.

``metarobust/configs/`` holds the configs (``meta/omniglot_maml.yaml``, ``quickstart.yaml``);
``metarobust/episodes/<dataset>/`` the class splits, class lists and frozen benchmark episodes.
They are package data, found with :mod:`importlib.resources`, so that a wheel carries them and
``metarobust quickstart`` runs from any install, not only from a checkout. In a checkout the
top-level ``configs`` and ``episodes`` are links to these two folders.

Episodes a user freezes never go into the installed package (a reinstall would lose them, and a
committed benchmark manifest must not change under a user): they go to
:func:`user_episodes_dir`, which lookups search after the shipped folder.

Example:
    >>> config_path("meta/omniglot_maml.yaml")  # a shipped name, from any working directory
    PosixPath('.../metarobust/configs/meta/omniglot_maml.yaml')
    >>> config_path("my_experiment.yaml")  # a file wins over a shipped name
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path

from metarobust.errors import ConfigError, DataError

CONFIG_PREFIX = "configs/"
"""Stripped from a config name, so that ``configs/meta/omniglot_maml.yaml`` (the checkout path the
docs use) also resolves outside a checkout."""


def package_folder(name: str) -> Path:
    """``metarobust/<name>`` of the imported package, as a filesystem path.

    Raises:
        DataError: the package is not installed as files (e.g. imported from a zip archive).
    """
    folder = resources.files("metarobust") / name
    if not isinstance(folder, Path):  # a zip import: OmegaConf and the readers need real files
        raise DataError(f"metarobust/{name} is not a folder on disk ({folder!r}); install metarobust "
                        f"with pip (a wheel or pip install -e .), not as a zip archive")
    return folder


def configs_dir() -> Path:
    """The shipped configs, ``metarobust/configs/``."""
    return package_folder("configs")


def episodes_dir() -> Path:
    """The shipped class splits and frozen benchmark episodes, ``metarobust/episodes/``."""
    return package_folder("episodes")


def shipped_configs() -> list[str]:
    """The shipped config names, relative to :func:`configs_dir` (``meta/omniglot_maml.yaml``)."""
    root = configs_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def config_description(name: str, width: int = 100) -> str:
    """The first sentence of a shipped config's leading comment (what it runs), cut to ``width``
    characters at a word, for ``metarobust list configs``."""
    words: list[str] = []
    for line in (configs_dir() / name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = re.search(r"\.\s(?=[A-Z])", text)  # a sentence's end, not "et al. 2022" or "eq. 7"
    text = text if end is None else text[: end.start() + 1]
    return text if len(text) <= width else text[: text.rfind(" ", 0, width - 3)] + "..."


def config_path(config: str | Path) -> Path:
    """The YAML file a config argument names: an existing file, else a shipped config by name.

    A name may omit ``.yaml`` and may start with ``configs/``: ``meta/omniglot_maml``,
    ``configs/meta/omniglot_maml.yaml`` and ``meta/omniglot_maml.yaml`` are the same shipped file.

    Raises:
        ConfigError: neither a file nor a shipped name; the message lists the closest names.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = Path(config).as_posix()
    name = name[len(CONFIG_PREFIX):] if name.startswith(CONFIG_PREFIX) else name
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    shipped = configs_dir() / name
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name, shipped_configs(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"config file {str(config)!r} does not exist and is not a shipped config name; "
                      f"{hint}give a YAML path or a shipped name such as meta/omniglot_maml.yaml "
                      f"(metarobust list configs)")


def user_episodes_dir() -> Path:
    """Where ``metarobust episodes freeze`` writes by default: ``$METAROBUST_EPISODES``, else
    ``~/.cache/metarobust/episodes`` (beside the datasets' default root), never the package."""
    env = os.environ.get("METAROBUST_EPISODES")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metarobust" / "episodes"


def shipped_manifest(dataset: str, filename: str) -> Path:
    """``metarobust/episodes/<dataset>/<filename>`` (it may not exist)."""
    return episodes_dir() / dataset / filename


def user_manifest(dataset: str, filename: str) -> Path:
    """``<user_episodes_dir()>/<dataset>/<filename>`` (it may not exist)."""
    return user_episodes_dir() / dataset / filename


def find_manifest(dataset: str, filename: str) -> Path:
    """The frozen episodes file a default lookup reads: the shipped benchmark if it exists (every
    method is scored on it, so a user's file never shadows it), else the user's copy, which is
    also the path returned when neither exists."""
    shipped = shipped_manifest(dataset, filename)
    return shipped if shipped.is_file() else user_manifest(dataset, filename)
