"""Two executions of the same per-task function: a per-task loop and ``torch.func.vmap``.

A *task function* computes one task's outer loss from the shared initial parameters:

    task_fn(params, support_x, support_y, query_x, query_y, noise) -> (loss, stats)

with ``stats`` a dict of 0-dim tensors (accuracies...) and ``noise`` the task's random-start
noise: ``None``, a tensor, or a dict of tensors (e.g. ``{"query": ..., "support": ...}``), each
with the task dimension first. ``meta_backward`` runs it over an
:class:`EpisodeBatch` and accumulates the meta-gradient of the mean task loss into
``param.grad``:

- ``loop``: one task at a time, calling ``backward`` per task so that only one task's graph
  is alive (lean in memory). Measured fastest on a 2-core CPU (BENCHMARKS.md).
- ``vmap``: all tasks in one vectorised graph; wins where small per-task kernels would leave
  a GPU idle.

``auto`` picks by device from those measurements: ``loop`` on CPU, ``vmap`` on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.func import vmap

from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.meta.functional import Params
from metarobust.precision import full_precision

Stats = dict[str, torch.Tensor]
TaskFn = Callable[..., tuple[torch.Tensor, Stats]]
EXECUTIONS = ("loop", "vmap")


def resolve_execution(execution: str, device: torch.device) -> str:
    """``auto`` -> the measured winner for ``device`` (loop on CPU, vmap on CUDA)."""
    if execution == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    if execution not in EXECUTIONS:
        raise ConfigError(f"meta.execution={execution!r}; expected auto, loop or vmap")
    return execution


Noise = torch.Tensor | dict[str, torch.Tensor] | None


def _task_inputs(batch: EpisodeBatch, noise: Noise) -> tuple:
    return (batch.support_x, batch.support_y, batch.query_x, batch.query_y, noise)


def _slice(value: torch.Tensor | dict[str, torch.Tensor] | None, t: int):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v[t] for k, v in value.items()}
    return value[t]


def _task(inputs: tuple, t: int) -> tuple:
    """Task ``t``'s slice of every input (a dict of tensors is sliced tensor by tensor)."""
    return tuple(_slice(v, t) for v in inputs)


def run_tasks(task_fn: Callable[..., tuple], params: Params, batch: EpisodeBatch,
              noise: Noise, execution: str) -> tuple:
    """``task_fn`` over every task of ``batch``; each output stacked over tasks (dim 0)."""
    inputs = _task_inputs(batch, noise)
    if execution == "vmap":
        in_dims = (None, 0, 0, 0, 0, None if noise is None else 0)
        return vmap(task_fn, in_dims=in_dims)(params, *inputs)
    outputs = [task_fn(params, *_task(inputs, t)) for t in range(batch.num_tasks)]
    return tuple(_stack([o[i] for o in outputs]) for i in range(len(outputs[0])))


def meta_backward(task_fn: TaskFn, params: Params, batch: EpisodeBatch, noise: Noise, execution: str,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  ) -> tuple[torch.Tensor, Stats]:
    """Accumulate ``d mean_t loss_t / d params`` into ``.grad``; return the mean loss and stats.

    Both executions compute the same gradient (tested to float64 precision). ``autocast``: the
    mixed-precision context the task functions run under (backward runs outside it).
    """
    tasks = batch.num_tasks
    if execution == "vmap":
        with autocast():
            losses, stats = run_tasks(task_fn, params, batch, noise, "vmap")
        full_precision(losses).mean().backward()
        return losses.detach().mean(), {k: v.detach().mean() for k, v in stats.items()}
    inputs = _task_inputs(batch, noise)
    total, sums = None, {}
    for t in range(tasks):
        with autocast():
            loss, stats = task_fn(params, *_task(inputs, t))
        (full_precision(loss) / tasks).backward()  # frees this task's graph before the next is built
        total = loss.detach() if total is None else total + loss.detach()
        for k, v in stats.items():
            sums[k] = v.detach() if k not in sums else sums[k] + v.detach()
    return full_precision(total) / tasks, {k: v / tasks for k, v in sums.items()}


def _stack(values: list) -> object:
    if isinstance(values[0], dict):
        return {k: torch.stack([v[k] for v in values]) for k in values[0]}
    return torch.stack(values)
