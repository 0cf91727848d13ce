"""Run folders: resolved config, metrics.jsonl, TensorBoard events, atomic checkpoints, report.

    runs/<name>/config.yaml        the resolved config (defaults + file + overrides)
    runs/<name>/metrics.jsonl      one JSON object per logged step ({"step": ..., "loss": ...})
    runs/<name>/events.out.tfevents.*   TensorBoard scalars (``tensorboard --logdir runs``)
    runs/<name>/checkpoints/last.pt     written atomically (temporary file, then rename)
    runs/<name>/report.md          a short human summary
    runs/<name>/eval.json          clean and robust accuracy (``metarobust eval``)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from metarobust.config import ExperimentConfig, to_yaml
from metarobust.errors import ConfigError

CHECKPOINT = "last.pt"


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place,
    so a killed process never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class RunDir:
    """One run's folder. ``resume=False`` refuses a folder that already holds a checkpoint."""

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, tensorboard: bool = True) -> None:
        self.path = Path(cfg.out_dir) / cfg.name
        self.checkpoint_path = self.path / "checkpoints" / CHECKPOINT
        if resume and not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {self.checkpoint_path}; start without "
                              f"--resume, or pass the name= of an existing run")
        if not resume and self.checkpoint_path.exists():
            raise ConfigError(f"run folder {self.path} already holds a checkpoint; pass --resume to "
                              f"continue it, or choose another name=...")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", to_yaml(cfg))
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path))

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        kept = [m for m in self.metrics() if m["step"] <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, map_location)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        return path

    def write_report(self, text: str) -> None:
        atomic_write_text(self.path / "report.md", text)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; give a run folder (runs/<name>) or a .pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
