"""When to prune and how much: gradual pruning schedules, and the compute they cost. Plain Python.

A schedule prunes at *events*, the step counts ``start, start + every, ..., end`` (a step count ``t``
means "after ``t`` optimizer steps": step ``t + 1`` runs with the sparsity set at event ``t``).
``sparsity(t)`` is the fraction of the prunable weights that are zero while step ``t + 1`` runs.

- ``geometric``: every event removes the same fraction of the weights still alive, so the density
  after event ``k`` of ``K`` is ``(1 - s)^((k + 1) / K)`` (from an initial sparsity 0). This is what
  Jin et al. ("The Journey Matters", ICLR'25) ran (their MaxText code, ``global_gradual``).
- ``cubic``: Zhu & Gupta, ``s_t = s_f + (s_0 - s_f)(1 - (t - t_0) / (end - t_0))^3``, evaluated at
  each event; with ``every = 1`` it equals ``torch.ao.pruning.scheduler.CubicSL`` at every step
  (``init_t = start``, ``delta_t = every``, ``total_t = (end - start) / every``). The first event is
  at ``s_0``: cubic prunes from the second event on.
- ``linear``: the sparsity grows by the same amount at every event.

Timing by compute (``resolve_by_compute``): the paper starts at 25% and ends at 75% of the training
FLOPs, counted with the shrinking active parameter count. FLOPs per step are proportional to the
active matmul parameters (``fixed`` dense ones + density × ``prunable``) at a constant token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("geometric", "cubic", "linear")


@dataclass(frozen=True)
class Schedule:
    kind: str
    final: float  # sparsity of the prunable weights after the last event
    start: int  # step count of the first event
    end: int  # step count of the last event: start + a multiple of every
    every: int = 1
    initial: float = 0.0  # sparsity before the first event (applied when training starts)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError(f"need 0 <= initial sparsity <= final sparsity < 1, got {self.initial}, {self.final}")
        if self.every < 1 or self.start < 0 or self.end < self.start or (self.end - self.start) % self.every:
            raise ValueError(f"events need every >= 1 and end = start + k * every, got start={self.start}, "
                             f"end={self.end}, every={self.every}")

    @property
    def num_events(self) -> int:
        return (self.end - self.start) // self.every + 1

    def events(self) -> range:
        return range(self.start, self.end + 1, self.every)

    def at_event(self, k: int) -> float:
        """Sparsity set by event ``k`` (0-based)."""
        n, s0, sf = self.num_events, self.initial, self.final
        if self.kind == "geometric":
            return 1.0 - (1.0 - s0) * ((1.0 - sf) / (1.0 - s0)) ** ((k + 1) / n)
        if self.kind == "linear":
            return s0 + (sf - s0) * (k + 1) / n
        span = self.end - self.start
        if span == 0:
            return sf
        t = self.start + k * self.every
        return min(max(sf + (s0 - sf) * (1.0 - (t - self.start) / span) ** 3, s0), sf)

    def last_event(self, t: int) -> int | None:
        """Index of the last event at or before step count ``t``; None before the first."""
        if t < self.start:
            return None
        return min((t - self.start) // self.every, self.num_events - 1)

    def sparsity(self, t: int) -> float:
        k = self.last_event(t)
        return self.initial if k is None else self.at_event(k)

    def is_event(self, t: int) -> bool:
        return self.start <= t <= self.end and (t - self.start) % self.every == 0

    # -- compute and average parameter count --------------------------------------------------------
    def density_steps(self, steps: int) -> float:
        """Sum over the first ``steps`` steps of the prunable density in force (exact, O(events))."""
        total, t = 0.0, 0
        density = 1.0 - self.initial
        for k, event in enumerate(self.events()):
            if event >= steps:
                break
            total += density * (event - t)
            t, density = event, 1.0 - self.at_event(k)
        return total + density * max(steps - t, 0)

    def compute(self, steps: int, fixed: float, prunable: float) -> float:
        """Active parameter-steps over the first ``steps`` steps (FLOPs / (6 × tokens per step))."""
        return fixed * steps + prunable * self.density_steps(steps)


def keep_count(numel: int, sparsity: float) -> int:
    """Weights kept at ``sparsity``: floor(density × numel), as the paper's threshold index does."""
    return min(numel, max(0, math.floor((1.0 - sparsity) * numel + 1e-9)))


def snap(kind: str, final: float, start: int, end: int, every: int, initial: float = 0.0) -> Schedule:
    """A schedule with ``end`` moved down onto the event grid (start + k × every)."""
    start = max(0, int(start))
    end = max(start, int(end))
    return Schedule(kind, final, start, start + (end - start) // every * every, every, initial)


def resolve_by_compute(kind: str, final: float, start_fraction: float, end_fraction: float, every: int,
                       total_steps: int, fixed: float, prunable: float, initial: float = 0.0) -> Schedule:
    """The schedule whose first event falls at ``start_fraction`` of the run's compute and whose last
    event at ``end_fraction`` (both counted with the active parameters, which the schedule itself sets).

    Fixed point on the start (the compute before it is dense, so it has a closed form given the total),
    bisection on the number of events for the end. Converges in a few rounds; exact to one ``every``.
    """
    if not 0.0 <= start_fraction <= end_fraction <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1 as fractions of compute, got {start_fraction}, {end_fraction}")
    dense = fixed + prunable * (1.0 - initial)
    start = round(start_fraction * total_steps)
    end = round(end_fraction * total_steps)
    seen = set()
    for _ in range(100):
        schedule = snap(kind, final, start, end, every, initial)
        total = schedule.compute(total_steps, fixed, prunable)
        new_start = min(round(start_fraction * total / dense), total_steps)
        new_end = _end_for(kind, final, new_start, end_fraction * total, every, total_steps, fixed, prunable, initial)
        if (new_start, new_end) == (start, end) or (new_start, new_end) in seen:
            start, end = new_start, new_end
            break
        seen.add((start, end))
        start, end = new_start, new_end
    return snap(kind, final, start, end, every, initial)


def _end_for(kind, final, start, target, every, total_steps, fixed, prunable, initial) -> int:
    """The last event (on the grid from ``start``) whose compute is nearest ``target``, holding the
    total fixed: the schedule's shape depends on its own end, so this searches over event counts
    (the compute up to the last event grows with it)."""

    def compute_at(k):
        end = start + k * every
        return Schedule(kind, final, start, end, every, initial).compute(end, fixed, prunable)

    lo, hi = 0, max(0, (total_steps - start) // every)
    while lo < hi:
        mid = (lo + hi) // 2
        if compute_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and target - compute_at(lo - 1) < compute_at(lo) - target:
        lo -= 1
    return start + lo * every


def steps_for_compute(budget: float, kind: str, final: float, start_fraction: float, end_fraction: float, every: int,
                      fixed: float, prunable: float, initial: float = 0.0) -> int:
    """The fewest steps whose compute, with the schedule timed by compute over that many steps, reaches
    ``budget`` active parameter-steps (FLOPs / (6 × tokens per step)): the length of a sparse run at equal
    compute with a dense one of ``budget / (fixed + prunable)`` steps. A pruned run is cheaper per step, so it
    gets more steps (between the dense count and the count at the final sparsity throughout)."""
    if budget <= 0:
        return 0
    lo = math.floor(budget / (fixed + prunable * (1.0 - initial)))
    hi = math.ceil(budget / (fixed + prunable * (1.0 - final))) + every + 1
    for steps in range(max(lo, 1), hi + 1):
        schedule = resolve_by_compute(kind, final, start_fraction, end_fraction, every, steps, fixed, prunable, initial)
        if schedule.compute(steps, fixed, prunable) >= budget:
            return steps
    return hi
