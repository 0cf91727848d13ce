"""``torch.compile`` for the attack and training steps, switched on by measurement.

``at.compile`` takes ``auto``, ``on`` or ``off`` (``true``/``false``, the 0.2 booleans, still mean
``on``/``off``). ``on`` compiles the models of a run (their forward and, through AOTAutograd,
their backward) and the PGD step update (:func:`metarobust.attacks.pgd.pgd_update`: step direction, projection onto the
ball and the box, with ``eps`` and the step as tensors, so that a new budget reuses the compiled
graph instead of recompiling); ``off`` is the eager reference. ``auto`` looks the run's
device kind and model family up in :data:`MEASURED`, the table ``scripts/bench.py`` prints and
(``--write-table``) writes, and compiles only where compilation measured faster *and* the run is
long enough to pay the compilation back::

    break-even steps = compile seconds / (eager step seconds x (1 - 1 / speedup))

Nothing is guessed: a device kind or model family that is not in the table runs eager, and
:func:`decide` says why. Meta recipes run their models through ``torch.func`` functional calls
per task; ``auto`` keeps them eager and ``on`` is refused for them (``MetaRecipe.config_check``).

Example:
    >>> decide("auto", "cpu", "preact_resnet18", steps=10).on       # too short to pay compilation
    False
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from metarobust.errors import ConfigError

SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class Measurement:
    """One row of :data:`MEASURED`: a PGD-AT training step and a PGD attack step of one model
    family on one device kind, eager against compiled, from ``scripts/bench.py``."""

    train_speedup: float
    """Eager training-step time over compiled (> 1: compiled is faster)."""
    attack_speedup: float
    """Eager PGD-10 time over compiled PGD-10 (eval mode)."""
    compile_s: float
    """Seconds the first compiled training step and attack call paid over eager ones."""
    eager_step_s: float
    """Seconds of one eager training step in the benchmark's workload."""
    source: str
    """Where and when it was measured (machine, load, command)."""

    @property
    def break_even_steps(self) -> float:
        """Training steps after which compilation has paid for itself (``inf`` if never)."""
        saving = self.eager_step_s * (1 - 1 / self.train_speedup)
        return self.compile_s / saving if saving > 0 else float("inf")


# BEGIN MEASURED (scripts/bench.py --write-table rewrites the lines up to END MEASURED)
MEASURED: dict[tuple[str, str], Measurement] = {
    ("cpu", "preact_resnet18"): Measurement(train_speedup=1.394, attack_speedup=1.679, compile_s=37.5, eager_step_s=2.4609, source='scripts/bench.py 2026-12-02, AMD EPYC, 1 threads, load 2.3, torch 2.14.1+cu130, width 16, batch 128, amp none'),
}
# END MEASURED
"""``(device kind, model family) -> Measurement``: what ``at.compile=auto`` decides from."""

MIN_SPEEDUP = 1.1
"""``auto`` compiles only where compiled steps measured at least this much faster."""


@dataclass(frozen=True)
class Decision:
    on: bool
    reason: str


def normalise(setting: object) -> str:
    """``auto``/``on``/``off`` from the config value (``true``/``false`` of 0.2 map to on/off)."""
    key = str(setting).strip().lower()
    key = {"true": "on", "false": "off", "1": "on", "0": "off"}.get(key, key)
    if key not in SETTINGS:
        raise ConfigError(f"at.compile={setting!r} is invalid; expected auto, on or off "
                          f"(true/false, the 0.2 booleans, mean on/off)")
    return key


def decide(setting: object, device: torch.device | str, family: str, steps: int | None = None) -> Decision:
    """Whether to compile the steps of a run on ``device`` with a model of ``family`` (its
    registry name, e.g. ``preact_resnet18``) lasting ``steps`` training steps (``None``: an
    evaluation or an unknown length, judged on the speedup alone)."""
    setting = normalise(setting)
    if setting != "auto":
        return Decision(setting == "on", f"at.compile={setting}")
    kind = torch.device(device).type
    row = MEASURED.get((kind, family))
    if row is None:
        return Decision(False, f"at.compile=auto: {family} on {kind} is not in the measurement table "
                               f"(metarobust.compilation.MEASURED); eager. Measure it with scripts/bench.py")
    if row.train_speedup < MIN_SPEEDUP:
        return Decision(False, f"at.compile=auto: compiled {family} steps on {kind} measured "
                               f"{row.train_speedup:.2f}x eager (< {MIN_SPEEDUP}); eager")
    if steps is not None and steps < row.break_even_steps:
        return Decision(False, f"at.compile=auto: compiling {family} on {kind} costs ~{row.compile_s:.0f} s and "
                               f"pays back after ~{row.break_even_steps:.0f} steps; this run has {steps}; eager")
    return Decision(True, f"at.compile=auto: compiled {family} steps on {kind} measured {row.train_speedup:.2f}x "
                          f"eager (compilation ~{row.compile_s:.0f} s, paid back after "
                          f"~{row.break_even_steps:.0f} steps)")


def is_compiled(module: object) -> bool:
    """Whether ``module`` is already a ``torch.compile`` wrapper."""
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def compile_module(module: nn.Module) -> nn.Module:
    """``module`` compiled for the steps, in inductor's default mode, with torch's default shape
    policy: static at first, and after the first new batch size (an epoch's last batch, the
    survivors of an attack cascade) one more graph with a dynamic batch dimension, instead of a
    graph per size."""
    return torch.compile(module)


_COMPILED_MODULES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def compiled_forward(forward: object) -> object:
    """``forward`` compiled once per module (cached); anything that is not an ``nn.Module`` (a
    closure over fast weights) or is compiled already is returned as it is. The compiled wrapper
    holds its module, so a module attacked with ``PGD(compile=True)`` stays alive with its
    compiled graphs for the life of the process (a handful of models in practice); pass a
    ``torch.compile`` module yourself to control its lifetime."""
    if not isinstance(forward, nn.Module) or is_compiled(forward):
        return forward
    compiled = _COMPILED_MODULES.get(forward)
    if compiled is None:
        compiled = _COMPILED_MODULES[forward] = compile_module(forward)
    return compiled


_FUNCTIONS: dict = {}


def compiled_function(fn):
    """``fn`` compiled with ``fullgraph=True`` (a graph break is an error, not a silent
    slowdown) and torch's default shape policy, once per function (cached): the PGD step update
    (:func:`metarobust.attacks.pgd.pgd_update`) is one compiled graph shared by every attack."""
    compiled = _FUNCTIONS.get(fn)
    if compiled is None:
        compiled = _FUNCTIONS[fn] = torch.compile(fn, fullgraph=True)
    return compiled


__all__ = ["MEASURED", "MIN_SPEEDUP", "SETTINGS", "Decision", "Measurement", "compile_module", "compiled_forward",
           "compiled_function", "decide", "is_compiled", "normalise"]
