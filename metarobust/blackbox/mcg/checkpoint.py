"""A trained MCG generator on disk: its weights and its :class:`GeneratorConfig`, nothing else.

Written atomically (a killed process never leaves half a file) and read with
``torch.load(weights_only=True)`` (tensors and plain containers only: loading runs no code).

    >>> save_generator("runs/mcg/generator.pt", g, {"surrogates": ["runs/a"]})
    >>> g, info = load_generator("runs/mcg/generator.pt")
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metarobust.blackbox.mcg.config import GeneratorConfig, known_fields
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.errors import ConfigError

FORMAT = "metarobust-mcg-generator/1"


def save_generator(path: str | Path, generator: MCGGenerator, info: dict[str, Any] | None = None) -> Path:
    """Write ``generator`` (weights + config) and ``info`` (plain data: how it was trained) to
    ``path`` atomically; returns the path."""
    from metarobust.runs import atomic_write_bytes

    state = {"format": FORMAT, "config": asdict(generator.cfg), "state_dict": generator.state_dict(),
             "info": info or {}}
    path = Path(path)
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MCGGenerator, dict[str, Any]]:
    """The generator saved at ``path`` (in eval mode) and its ``info``; a missing or foreign
    file is a :class:`ConfigError` naming what was expected."""
    path = Path(path)
    expected = "a generator checkpoint written by `metarobust blackbox-train` (save_generator)"
    if not path.is_file():
        raise ConfigError(f"mcg.generator={str(path)!r}: no such file; expected {expected}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, foreign, or holding Python objects
        raise ConfigError(f"mcg.generator={str(path)!r} cannot be read ({type(exc).__name__}); "
                          f"expected {expected}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"mcg.generator={str(path)!r} is not {expected} (format {FORMAT!r})")
    generator = MCGGenerator(GeneratorConfig(**known_fields(GeneratorConfig, state["config"], str(path))))
    generator.load_state_dict(state["state_dict"])
    return generator.to(map_location).eval(), dict(state.get("info") or {})


__all__ = ["FORMAT", "load_generator", "save_generator"]
