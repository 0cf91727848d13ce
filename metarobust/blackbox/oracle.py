"""The black-box boundary: an :class:`Oracle` answers queries about a target and nothing else.

A query-based attack (:mod:`metarobust.blackbox`) sees the target only through an oracle. The
oracle wraps any ``forward`` (a plain model, or a few-shot learner's weights adapted on an
episode's support set, :func:`metarobust.evaluation.fewshot.adapted_episodes`) and returns only
scores (probabilities or logits) or only the top-1 label, computed under ``torch.no_grad`` and
detached, so no gradient and no parameter is reachable from what it returns. It counts every
image sent, per attacked example, and refuses a query past an example's budget
(:class:`QueryBudgetExceeded`) before the target runs. With ``levels=256`` it quantises every
input to the 8-bit grid first, as a deployed target that receives image files would, so an
attack cannot win with changes smaller than a quantum.

Query accounting (docs/blackbox.md): every image an attack sends counts, one query each,
whatever it is for (a loss value, a finite-difference probe, or checking whether the current
point already fools the target). The final adversarial examples are re-scored by
:meth:`Oracle.verify` outside the budget; those queries are counted apart
(:attr:`Oracle.verification_queries`) and reported, never added to an example's count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarobust.errors import ConfigError, MetarobustError

Forward = Callable[[torch.Tensor], torch.Tensor]
OUTPUTS = ("probs", "logits", "label")


class QueryBudgetExceeded(MetarobustError, RuntimeError):
    """An attack asked the oracle for more queries than an example's budget allows. Nothing was
    sent to the target: the counts are those before the refused call."""


class Oracle:
    r"""Score-only (or label-only) access to ``forward`` with per-example query budgets.

    Arguments:
        forward: ``x [M, C, H, W] -> logits [M, N]`` of the target (a module or a function of
            adapted weights); never exposed.
        budget (int or Tensor [B]): queries allowed per attacked example.
        examples (int): the number ``B`` of attacked examples (default: ``len(budget)``, else 1).
        output (str): what a query returns: ``"probs"`` (softmax, the default of Bandits, NES,
            SimBA), ``"logits"``, or ``"label"`` (top-1 class only, ``int64 [M]``).
        levels (int or None): quantise inputs to ``levels`` grey levels per channel before the
            target sees them (``256``: 8-bit images); ``None`` sends them as they are.
        context (Tensor [B, C, H, W] or None): for a target whose answer for an image depends on
            its batch (transductive batch norm, MAML's few-shot convention): the clean batch
            (an episode's query set, the attacked examples in order). An image for example
            ``i`` is then scored inside this batch with slot ``i`` replaced by it, as the
            deployed learner would score its query set with that one image changed
            (``torch.func.vmap`` over the images). ``None``: each image is scored on its own.

    Call: ``oracle(x, index=None) -> scores [M, N]`` (or labels ``[M]``), where ``index [M]``
    names the attacked example each image belongs to (repeats allowed: an attack probing one
    example with 50 images passes its index 50 times); ``None`` means ``x`` holds all ``B``
    examples in order, so the oracle is itself a ``forward`` for score-based attacks written in
    the white-box calling convention (Square, :mod:`metarobust.attacks`). Inputs must lie in
    [0, 1]. :meth:`restricted` gives such a forward for a subset of the examples.

    Example::
        >>> oracle = Oracle(model, budget=1000, examples=len(x), output="probs", levels=256)
        >>> p = oracle(x)                          # one query for each example
        >>> oracle.queries                          # tensor([1, 1, ...])
        >>> fooled = oracle.verify(x_adv, y)       # outside the budget
    """

    def __init__(self, forward: Forward, budget: int | torch.Tensor, examples: int | None = None,
                 output: str = "probs", levels: int | None = None, context: torch.Tensor | None = None) -> None:
        if output not in OUTPUTS:
            raise ConfigError(f"oracle output={output!r}; choose one of {list(OUTPUTS)}")
        if levels is not None and (int(levels) != levels or levels < 2):
            raise ConfigError(f"oracle levels={levels}; expected an integer >= 2 (256: 8-bit) or null")
        if isinstance(budget, torch.Tensor):
            budget = budget.detach().long().flatten()
            examples = budget.numel() if examples is None else examples
        else:
            examples = 1 if examples is None else examples
            budget = torch.full((examples,), int(budget), dtype=torch.long)
        if budget.numel() != examples:
            raise ConfigError(f"oracle budget has {budget.numel()} entries for {examples} examples")
        if bool((budget < 0).any()):
            raise ConfigError(f"oracle budget={budget.tolist()} must be >= 0 queries")
        if context is not None and context.shape[0] != examples:
            raise ConfigError(f"oracle context holds {context.shape[0]} images for {examples} examples")
        self._forward = forward
        self.context = None if context is None else context.detach()
        self.output = output
        self.levels = levels
        self.examples = examples
        self.budget = budget
        self.queries = torch.zeros(examples, dtype=torch.long)
        self.verification_queries = 0
        self._device: torch.device | None = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def scores(self) -> bool:
        """Whether a query returns scores (probabilities or logits), not only a label."""
        return self.output != "label"

    @property
    def remaining(self) -> torch.Tensor:
        """Queries left per example ``[B]`` (on the device of the last query)."""
        return (self.budget - self.queries).to(self._device or self.budget.device)

    def stop(self, done: torch.Tensor) -> None:
        """End the examples ``done`` (``bool [B]``): their budget shrinks to the queries already
        spent, so any later query for them is refused (an example fooled by a seeding proposal
        stops there; the count it paid stays)."""
        done = done.detach().bool().flatten().cpu()
        if done.numel() != self.examples:
            raise ValueError(f"stop() needs a flag per example ({self.examples}), got {done.numel()}")
        self.budget = torch.where(done, self.queries, self.budget)

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the target receives it: rounded to the grid of ``levels`` values in [0, 1]."""
        if self.levels is None:
            return x
        top = self.levels - 1
        return torch.round(x * top) / top

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            if x.shape[0] != self.examples:
                raise ValueError(f"oracle(x) without index needs all {self.examples} examples, got "
                                 f"{x.shape[0]} images; pass index= (the example of each image)")
            index = torch.arange(self.examples)
        index = index.detach().long().flatten().cpu()
        if index.numel() != x.shape[0]:
            raise ValueError(f"index has {index.numel()} entries for {x.shape[0]} images")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.examples):
            raise ValueError(f"index values must be in [0, {self.examples}), got {index.min()}..{index.max()}")
        x = self._checked(x)  # a refused input costs nothing
        spent = self.queries + torch.bincount(index, minlength=self.examples)
        over = spent > self.budget
        if bool(over.any()):
            which = over.nonzero().flatten()[:5].tolist()
            raise QueryBudgetExceeded(
                f"query budget exceeded for example(s) {which}: this call would bring them to "
                f"{spent[which].tolist()} queries, budget {self.budget[which].tolist()}; an attack must "
                f"check oracle.remaining before querying")
        self.queries = spent
        self._device = x.device
        answer = self._answer(x, index)
        self._remember(x, index, answer)
        return answer

    @property
    def last(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(x [B, ...], answers [B, ...], answered bool [B])``: per example the last image a
        charged query sent (as the target received it: quantised) and the answer it was given;
        ``None`` before any query. What an attacker keeps of its own queries (MCG's history,
        META.md 3.4 step 6); verification queries are not in it."""
        return self._last

    def _remember(self, x: torch.Tensor, index: torch.Tensor, answer: torch.Tensor) -> None:
        if not len(index):
            return
        if self._last is None:
            self._last = (torch.zeros((self.examples, *x.shape[1:]), dtype=x.dtype, device=x.device),
                          torch.zeros((self.examples, *answer.shape[1:]), dtype=answer.dtype, device=x.device),
                          torch.zeros(self.examples, dtype=torch.bool, device=x.device))
        points, answers, answered = self._last
        index = index.to(x.device)
        order = torch.arange(len(index), device=x.device)  # an example sent twice keeps its later image
        latest = torch.full((self.examples,), -1, dtype=torch.long, device=x.device).scatter_reduce(
            0, index, order, "amax")
        sent = latest >= 0
        points[sent] = self.quantise(x[latest[sent]])
        answers[sent] = answer[latest[sent]].to(answers.device)
        answered |= sent

    def restricted(self, index: torch.Tensor) -> Forward:
        """A ``forward`` for the examples ``index [M]``: ``f(x [M, ...])`` counts image ``i`` to
        example ``index[i]``."""
        return lambda x: self(x, index)

    def verify(self, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Whether the target misclassifies each of ``x_adv [B, ...]`` (labels ``y [B]``), or
        with ``target [B]`` (a targeted attack) labels each as its target, from one fresh query
        per example that is counted in :attr:`verification_queries`, not in the examples'
        budgets. Returns ``bool [B]``."""
        self.verification_queries += x_adv.shape[0]
        predicted = self.predict(x_adv)
        if target is not None:
            return predicted == target.to(x_adv.device)
        return predicted != y.to(x_adv.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 labels ``[B]`` of the examples' images ``x [B, ...]`` (in order), outside the
        budget: for the clean accuracy and :meth:`verify`."""
        return self._logits(self._checked(x), torch.arange(x.shape[0])).argmax(dim=-1)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"oracle inputs must lie in [0, 1]; got values in [{float(x.min()):.4g}, "
                             f"{float(x.max()):.4g}] (an attack must project onto the box)")
        return x

    def _logits(self, x: torch.Tensor, index: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        x = self.quantise(x)
        with torch.no_grad():
            if self.context is None:
                return self._forward(x).detach().float()
            out = []
            context = self.quantise(self.context.to(x.device))
            for lo in range(0, x.shape[0], chunk):  # each image in its own copy of the batch
                xs, slots = x[lo:lo + chunk], index[lo:lo + chunk].to(x.device)
                rows = torch.arange(xs.shape[0], device=x.device)
                batches = context.unsqueeze(0).repeat(xs.shape[0], *([1] * context.dim()))
                batches[rows, slots] = xs
                out.append(torch.func.vmap(self._forward)(batches)[rows, slots])
            return torch.cat(out).detach().float()

    def _answer(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x, index)
        if self.output == "label":
            return logits.argmax(dim=-1)
        return logits.softmax(dim=-1) if self.output == "probs" else logits


def log_probs(scores: torch.Tensor, output: str) -> torch.Tensor:
    """Log-probabilities ``[M, N]`` from an oracle's scores (``"probs"`` or ``"logits"``)."""
    if output == "probs":
        return scores.clamp_min(1e-30).log()
    if output == "logits":
        return scores.log_softmax(dim=-1)
    raise ConfigError(f"a score-based attack needs oracle output 'probs' or 'logits', got {output!r}")


__all__ = ["OUTPUTS", "Oracle", "QueryBudgetExceeded", "log_probs"]
