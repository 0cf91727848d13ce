"""Run folders: one process owns each; resolved config, metrics, TensorBoard, atomic checkpoints,
provenance, evaluations, report (docs/runs.md).

    runs/<name>/run.lock           held (``flock``) by the one process that trains into the folder
    runs/<name>/config.yaml        the resolved config (defaults + file + overrides)
    runs/<name>/provenance.json    who ran what where: one entry per start and per --resume
    runs/<name>/metrics.jsonl      one JSON object per logged step ({"step": ..., "loss": ...})
    runs/<name>/events.out.tfevents.*   TensorBoard scalars (``tensorboard --logdir runs``)
    runs/<name>/checkpoints/last.pt     written atomically (temporary file, then rename)
    runs/<name>/checkpoints/best.pt     ``at.select=best``: the best epoch on the held-out images
                                        (same format; the run's model for eval, id, teachers)
    runs/<name>/eval.json          the evaluation at the end of training
    runs/<name>/eval/<name>.json   each later ``metarobust eval`` (its attack, manifest, intervals)
    runs/<name>/report.md          a short human summary of all of them

:class:`RunDir` is a training process's hold on its folder (lock, fresh start or checked resume);
:class:`RunFolder` is what ``metarobust eval``/``id`` read and add to (never the config, never
the lock). What ``--resume`` may change is :data:`RESUME_APPLIED`; everything else is refused
before any file is written (:func:`resume_changes`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from metarobust.config import MOVED, ExperimentConfig, experiment_schema, to_dict, to_yaml
from metarobust.errors import ConfigError

try:  # POSIX; elsewhere run folders are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "last.pt"
BEST = "best.pt"
"""The checkpoint of the epoch ``at.select=best`` selected (same format as ``last.pt``, which stays
the one training resumes from)."""
LOCK = "run.lock"
PROVENANCE = "provenance.json"
EVAL_DIR = "eval"
RUN_OUTPUTS = ("metrics.jsonl", "report.md", "eval.json", "robustness_vs_eps.png", PROVENANCE, "episodes.json",
               "id.json", "id.png")
"""Files a run writes besides its config and checkpoint: a fresh start in a folder that holds no
checkpoint removes them (and the TensorBoard events and ``eval/``), so nothing stale is appended to."""

RESUME_APPLIED: dict[str, str] = {
    "name": "the run's folder (a moved or renamed run resumes)",
    "out_dir": "the run's folder (a moved or renamed run resumes)",
    "device": "where training continues; the checkpoint is loaded onto it",
    "data.root": "where the dataset's files are found (the same dataset, image size and rotations)",
    "data.download": "whether missing files may be fetched",
    "optim.lr": "the learning rate from the checkpoint's step on (set into the restored optimizer)",
    "optim.schedule": "the schedule from the checkpoint's step on (a closed form of the step)",
    "optim.milestones": "the schedule from the checkpoint's step on",
    "optim.gamma": "the schedule from the checkpoint's step on",
    "optim.cyclic_peak": "the schedule from the checkpoint's step on",
    "optim.weight_decay": "set into the restored optimizer's parameter groups",
    "optim.momentum": "set into the restored optimizer's parameter groups (its momentum buffers are kept)",
    "optim.nesterov": "set into the restored optimizer's parameter groups",
    "train.iterations": "the run's length (meta-learning); the schedule follows the new length",
    "at.epochs": "the run's length (plain recipes); the schedule follows the new length",
    "train.log_every": "how often metrics are logged",
    "train.checkpoint_every": "how often checkpoints are written",
    "meta.inner_lr": "the inner-loop learning rate from the checkpoint's step on (the NaN advice)",
    "meta.execution": "loop or vmap: the same computation",
    "meta.test_inner_steps": "evaluation only",
    "at.amp": "mixed precision from the checkpoint's step on (the NaN advice); a GradScaler starts afresh",
    "at.compile": "speed only",
    "at.channels_last": "speed only",
    "attack": "evaluation only (the whole section)",
    "eval": "evaluation only (the whole section)",
    "analysis": "metarobust id only (the whole section)",
}
"""What ``--resume`` applies when the config differs from the checkpoint's: dotted keys, or a
whole section. Every other key (``recipe``, ``seed``, ``model.*``, ``data.dataset``,
``meta.ways``/shots/queries/``meta_batch_size``/``inner_steps``/``first_order``/``adapt``,
``train_attack.*``, ``optim.name``, ``at.batch_size``, the recipes' sections...) changes what the
checkpoint means and is refused."""


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


class RunFolder:
    """An existing run's folder as ``metarobust eval`` and ``id`` use it: read its checkpoint and
    metrics, add evaluations and rewrite the report; never its config, never its lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint_path = self.path / "checkpoints" / CHECKPOINT
        self.best_path = self.path / "checkpoints" / BEST

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def metrics(self) -> list[dict[str, Any]]:
        """The logged lines; a torn last line (the process was killed while writing it) is skipped."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # killed mid-write: that step is logged again on resume
                    break
                raise ConfigError(f"{self.metrics_path} line {number} is not JSON ({line[:80]!r}); the file is "
                                  f"damaged: delete that line, or start the run again under another name=") from None
        return out

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, map_location)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        return path

    def write_report(self, text: str) -> None:
        atomic_write_text(self.path / "report.md", text)

    def evaluations(self) -> dict[str, dict[str, Any]]:
        """Every ``eval/<name>.json`` by name (sorted), for the report."""
        folder = self.path / EVAL_DIR
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    def close(self) -> None:
        pass


class RunDir(RunFolder):
    """One training run's folder, owned by this process until :meth:`close` (or its exit).

    ``resume=False``: refuses a folder that holds a checkpoint; a folder without one (a run that
    died before its first checkpoint) is started clean (:data:`RUN_OUTPUTS` removed).
    ``resume=True``: needs the checkpoint, and compares ``cfg`` with the config saved in it before
    anything is written (:func:`resume_changes`): a change that alters what the checkpoint means is
    a :class:`ConfigError`; the others (:data:`RESUME_APPLIED`) are applied and reported
    (``changes``, a warning, ``provenance.json``). Temporary files of interrupted atomic writes are
    removed; TensorBoard drops the events logged after the checkpoint (``purge_step``).

    Args:
        cfg: the run's config (the folder is ``cfg.out_dir/cfg.name``).
        resume: continue from ``checkpoints/last.pt``.
        tensorboard: write TensorBoard events.
        device: the device training runs on, for ``provenance.json`` (the trainer records it too).

    Example:
        >>> run = RunDir(cfg, resume=True)          # ConfigError if cfg.seed changed, say
        >>> run.changes                              # {"optim.lr": (0.001, 0.0005)}
    """

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, tensorboard: bool = True,
                 device: str | torch.device | None = None) -> None:
        super().__init__(Path(cfg.out_dir) / cfg.name)
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.resumed_from: int | None = None
        self._state: dict[str, Any] | None = None
        self._writer = None
        if resume and not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {self.checkpoint_path}; start without "
                              f"--resume, or pass the name= of an existing run")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = acquire_lock(self.path)
        try:
            remove_temporary_files(self.path)
            if resume:
                self._state = load_checkpoint(self.checkpoint_path)
                self.resumed_from = int(self._state["step"])
                self.changes = resume_changes(self._state.get("config") or {}, cfg, self.path, self.resumed_from)
                if self.changes:
                    warnings.warn(f"--resume of {self.path} at step {self.resumed_from} applies: "
                                  + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()),
                                  stacklevel=2)
            elif self.checkpoint_path.exists():
                raise ConfigError(f"run folder {self.path} already holds a checkpoint; pass --resume to "
                                  f"continue it, or choose another name=... (or delete the folder to start over)")
            else:
                clean_outputs(self.path)
            atomic_write_text(self.path / "config.yaml", to_yaml(cfg))
            self.record(start=True, device=None if device is None else str(device))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if self.resumed_from is None else self.resumed_from + 1
                self._writer = SummaryWriter(str(self.path), purge_step=purge)
        except BaseException:
            release_lock(self._lock)
            raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again), and a
        torn last line."""
        kept = [m for m in self.metrics() if m["step"] <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.checkpoint_path, lambda f: torch.save(state, f))

    def save_best(self, state: dict[str, Any]) -> None:
        """Write the selected epoch's checkpoint (``checkpoints/best.pt``) atomically."""
        atomic_write_bytes(self.best_path, lambda f: torch.save(state, f))

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint; on resume, the one already read to compare configs (read once)."""
        if self._state is not None:
            state, self._state = self._state, None
            return state
        return super().load_checkpoint(map_location)

    def record(self, start: bool = False, **values: Any) -> None:
        """Add ``values`` to this process's entry of ``provenance.json`` (``start``: open a new
        entry: versions, git commit, command, host, time, and the resume step and changes)."""
        path = self.path / PROVENANCE
        entries: list[dict[str, Any]] = []
        if path.is_file():
            try:
                entries = json.loads(path.read_text())["runs"]
            except (ValueError, KeyError, TypeError):  # damaged: keep a copy, start a new list
                shutil.copyfile(path, path.with_suffix(".json.damaged"))
        if start or not entries:
            entry = provenance()
            entry["resumed_from_step"] = self.resumed_from
            entry["changes"] = {k: {"checkpoint": old, "now": new} for k, (old, new) in self.changes.items()}
            entries.append(entry)
        entries[-1].update({k: v for k, v in values.items() if v is not None})
        atomic_write_text(path, json.dumps({"runs": entries}, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        release_lock(self._lock)
        self._lock = None


# -- ownership ----------------------------------------------------------------------------------
_HELD: dict[Path, list[int]] = {}
"""Lock files this process holds: resolved path -> [file descriptor, holders]. A process may open
its own run folder twice (a test resuming the run it just killed); another process may not."""


def acquire_lock(folder: Path) -> Path | None:
    """Take ``folder/run.lock`` (``flock``, released by the kernel when the process ends, so a crash
    leaves no stale lock); :class:`ConfigError` naming the holder if another process has it."""
    if fcntl is None:
        return None
    path = (folder / LOCK).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"run folder {folder} is in use by {holder}; wait for it to end (or stop it), or "
                          f"choose another name=...") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode())
    _HELD[path] = [fd, 1]
    return path


def release_lock(path: Path | None) -> None:
    if path is None or path not in _HELD:
        return
    _HELD[path][1] -= 1
    if _HELD[path][1] == 0:
        fd, _ = _HELD.pop(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- a clean folder -----------------------------------------------------------------------------
def remove_temporary_files(folder: Path) -> list[Path]:
    """Remove what interrupted atomic writes left behind (``.<file>.*.tmp`` beside the checkpoint
    and the files training writes). Called with the folder's lock held."""
    names = ("config.yaml", *RUN_OUTPUTS)
    found = list((folder / "checkpoints").glob(".*.tmp"))
    found += [p for name in names for p in folder.glob(f".{name}.*.tmp")]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def clean_outputs(folder: Path) -> None:
    """A fresh start: remove a previous attempt's outputs (:data:`RUN_OUTPUTS`, TensorBoard events,
    ``eval/``) so that nothing is appended to them."""
    for name in RUN_OUTPUTS:
        (folder / name).unlink(missing_ok=True)
    (folder / "checkpoints" / BEST).unlink(missing_ok=True)  # a killed attempt's selection
    for p in folder.glob("events.out.tfevents.*"):
        p.unlink()
    shutil.rmtree(folder / EVAL_DIR, ignore_errors=True)


# -- what --resume may change -------------------------------------------------------------------
def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}, "seed": 0}`` -> ``{"optim.lr": 0.1, "seed": 0}``: sections to their
    fields, whose values (lists, ``eval.union``'s dict...) are compared whole."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": list(v) if isinstance(v, tuple) else v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _applied(key: str) -> bool:
    return key in RESUME_APPLIED or key.split(".", 1)[0] in RESUME_APPLIED


def resume_changes(saved: dict[str, Any], cfg: ExperimentConfig, where: Path | str = "the run",
                   step: int | None = None) -> dict[str, tuple[Any, Any]]:
    """The keys whose value in ``cfg`` differs from the checkpoint's config ``saved``, as
    ``{key: (saved, now)}``; :class:`ConfigError` if one of them is not in :data:`RESUME_APPLIED`.
    Keys a checkpoint predates take their defaults; keys that moved (``meta.meta_lr``) are read
    under their new name."""
    defaults = _flatten(to_dict(experiment_schema()()))
    stored = dict(defaults)
    for key, value in _flatten(saved).items():
        for old, new in MOVED.items():
            if key == old or key.startswith(old + "."):
                key = new + key[len(old):]
        if key in defaults:
            stored[key] = value
    now = _flatten(to_dict(cfg))
    changes = {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}
    refused = {k: change for k, change in changes.items() if not _applied(k)}
    if refused:
        at = f" (checkpoint step {step})" if step is not None else ""
        listed = "; ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"--resume: {where}{at} was trained with other settings, and these change what the checkpoint means: "
            f"{listed}. Resume with the run's values (its config.yaml), or start a new run under another name=...; "
            f"--resume can change only {sorted(RESUME_APPLIED)} (docs/runs.md)")
    return changes


# -- provenance ---------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(where: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``where`` (the package), or ``None``
    (no git, not a checkout, or git too slow): never an error."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance() -> dict[str, Any]:
    """Who ran what where: package versions, git commit, command line, host, start time."""
    import metarobust

    return {
        "started": _now(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else list(sys.argv),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "versions": {"metarobust": getattr(metarobust, "__version__", None) or _version("metarobust"),
                     "torch": torch.__version__, "torchvision": _version("torchvision"),
                     "numpy": _version("numpy"), "python": platform.python_version()},
        "git": git_commit(),
    }


def model_checkpoint(folder: str | Path) -> Path:
    """The checkpoint holding a run folder's model: ``checkpoints/best.pt`` when the run selected
    its best epoch (``at.select=best``), else ``checkpoints/last.pt``."""
    best = Path(folder) / "checkpoints" / BEST
    return best if best.is_file() else Path(folder) / "checkpoints" / CHECKPOINT


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only). A run
    folder gives its model's checkpoint (:func:`model_checkpoint`: ``best.pt`` when the run
    selected one, else ``last.pt``); resuming reads ``last.pt`` itself (:class:`RunDir`)."""
    path = Path(path)
    if path.is_dir():
        path = model_checkpoint(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; give a run folder (runs/<name>) or a .pt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None


__all__ = ["BEST", "CHECKPOINT", "RESUME_APPLIED", "RUN_OUTPUTS", "RunDir", "RunFolder", "acquire_lock", "atomic_write_bytes",
           "atomic_write_text", "clean_outputs", "git_commit", "load_checkpoint", "model_checkpoint", "provenance", "release_lock",
           "remove_temporary_files", "resume_changes"]
