"""sparse: the schedules (plain Python) against torch.ao's CubicSL and the paper's numbers."""

import math

import pytest
import torch
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

from trainer_plugins_sparse.schedule import Schedule, keep_count, resolve_by_compute, snap, steps_for_compute


def cubic_sl_levels(init_sl, final, init_t, delta_t, total_t, steps):
    """CubicSL's sparsity level after each of ``steps`` scheduler steps (index t = after t steps)."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=final)
    sparsifier.prepare(net, config=[{"tensor_fqn": "0.weight"}])
    scheduler = CubicSL(sparsifier, init_sl=init_sl, init_t=init_t, delta_t=delta_t, total_t=total_t)
    levels = [scheduler.get_last_sl()[0]]
    for _ in range(steps):
        sparsifier.step()
        scheduler.step()
        levels.append(scheduler.get_last_sl()[0])
    return levels


@pytest.mark.parametrize("init_sl", [0.0, 0.1])
def test_cubic_equals_torch_cubicsl_at_every_step(init_sl):
    reference = cubic_sl_levels(init_sl, 0.8, init_t=5, delta_t=1, total_t=20, steps=40)
    ours = Schedule("cubic", 0.8, start=5, end=25, every=1, initial=init_sl)
    assert [ours.sparsity(t) for t in range(41)] == pytest.approx(reference, abs=1e-12)


def test_cubic_with_a_prune_frequency_equals_cubicsl_at_each_event_and_holds_between():
    reference = cubic_sl_levels(0.0, 0.6, init_t=10, delta_t=5, total_t=6, steps=60)
    ours = Schedule("cubic", 0.6, start=10, end=40, every=5)
    for t in range(61):
        last_event = t if t < 10 else min(10 + (t - 10) // 5 * 5, 40)
        assert ours.sparsity(t) == pytest.approx(reference[last_event], abs=1e-12)
    assert [t for t in range(61) if ours.is_event(t)] == [10, 15, 20, 25, 30, 35, 40]


def test_geometric_removes_the_same_fraction_of_live_weights_at_each_event():
    s = Schedule("geometric", 0.5, start=100, end=1000, every=100)
    density = [1 - s.at_event(k) for k in range(s.num_events)]
    ratios = [density[k + 1] / density[k] for k in range(len(density) - 1)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios)) and density[0] == pytest.approx(ratios[0])
    assert s.sparsity(99) == 0 and s.sparsity(1000) == pytest.approx(0.5) and s.sparsity(5000) == pytest.approx(0.5)


def test_linear_steps_are_equal():
    s = Schedule("linear", 0.6, start=0, end=50, every=10, initial=0.1)
    assert [s.sparsity(t) for t in (0, 9, 10, 50)] == pytest.approx([0.1 + 0.5 / 6, 0.1 + 0.5 / 6, 0.1 + 1.0 / 6, 0.6])


@pytest.mark.parametrize("final, total, start, end", [
    (0.5, 72200, 12500, 47200),  # llama2-1b config of Jin et al.'s code
    (0.6, 26800, 4100, 16600),  # llama2-70m
])
def test_geometric_by_compute_reproduces_the_papers_start_and_end(final, total, start, end):
    """'Start at 25%, end at 75% of training compute' with the active parameter count shrinking
    (methods.md 5.2): the configs' step numbers come back, to one prune interval."""
    s = resolve_by_compute("geometric", final, 0.25, 0.75, every=100, total_steps=total, fixed=0, prunable=1.0)
    assert abs(s.start - start) <= 100 and abs(s.end - end) <= 100
    whole = s.compute(total, 0, 1.0)
    assert s.compute(s.start, 0, 1.0) / whole == pytest.approx(0.25, abs=1e-3)
    assert s.compute(s.end, 0, 1.0) / whole == pytest.approx(0.75, abs=2e-3)


def test_compute_counts_dense_parameters_and_the_paper_example():
    s = Schedule("geometric", 0.5, start=12500, end=47200, every=100)
    # methods.md 5.2: C = 12,500 + 25,030 + 12,500 (mean density over the pruning phase 0.5 / ln 2)
    assert s.compute(72200, 0, 1.0) == pytest.approx(12500 + 34700 * 0.5 / math.log(2) + 12500, rel=2e-3)
    assert s.compute(10, fixed=3.0, prunable=1.0) == 40.0


def test_keep_count_and_snap():
    assert keep_count(10, 0.5) == 5 and keep_count(7, 0.5) == 3 and keep_count(4, 0.0) == 4
    assert snap("linear", 0.5, 3, 20, 5).end == 18


@pytest.mark.parametrize("kw", [dict(kind="quadratic"), dict(final=1.0), dict(initial=0.6), dict(end=17),
                                dict(every=0), dict(start=30, end=20)])
def test_bad_schedules_are_refused(kw):
    base = dict(kind="linear", final=0.5, start=0, end=20, every=5, initial=0.0)
    with pytest.raises(ValueError):
        Schedule(**{**base, **kw})


@pytest.mark.parametrize("kind, final, fixed", [("geometric", 0.5, 12_585_216), ("cubic", 0.9, 1_000_000),
                                                ("linear", 0.75, 0)])
def test_steps_for_compute_match_a_dense_runs_compute(kind, final, fixed):
    """A sparse run at equal compute with a dense one: the fewest steps whose compute (the schedule timed by
    compute over those steps) reaches the dense run's. More steps than the dense run, fewer than a run at the
    final sparsity throughout would get."""
    prunable, dense_steps = 3_145_728, 240
    budget = dense_steps * (fixed + prunable)
    steps = steps_for_compute(budget, kind, final, 0.25, 0.75, 10, fixed, prunable)

    def compute(n):
        return resolve_by_compute(kind, final, 0.25, 0.75, 10, n, fixed, prunable).compute(n, fixed, prunable)

    assert compute(steps) >= budget > compute(steps - 1)
    assert dense_steps < steps < budget / (fixed + prunable * (1 - final))
    assert steps_for_compute(budget, kind, 0.0, 0.25, 0.75, 10, fixed, prunable) == dense_steps  # dense: itself
