"""sparse: exact magnitude pruning in plain torch, gradients and optimizer moments of pruned weights."""

import pytest
import torch

from trainer_plugins_sparse.pruning import Comm, Pruner, Target, mask_gradients, state_like
from trainer_plugins_sparse.schedule import keep_count


def weights(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def pruner(params, optimizer=None, **kw):
    targets = [Target(f"w{i}", p, tuple(p.shape), p.detach().view(-1),
                      copies=lambda p=p: [(t, 0) for t in state_like(optimizer, p)]) for i, p in enumerate(params)]
    return Pruner(targets, **kw)


def keep(sparsity):
    return lambda numel: keep_count(numel, sparsity)


# radix digit widths and histogram lanes (a GPU's default: 8 bits, 16 lanes): the same selection
@pytest.mark.parametrize("digit_bits, lanes", [(None, None), (8, None), (11, None), (16, None), (8, 16), (11, 4)])
def test_global_magnitude_keeps_exactly_the_largest(digit_bits, lanes):
    params = weights((16, 24), (40, 8), (5, 7))
    before = torch.cat([p.detach().abs().view(-1) for p in params])
    n_keep = keep_count(before.numel(), 0.37)
    pruner(params, digit_bits=digit_bits, lanes=lanes).prune(keep(0.37))
    after = torch.cat([p.detach().view(-1) for p in params])
    assert int((after != 0).sum()) == n_keep
    assert torch.equal((after != 0), before >= before.topk(n_keep).values.min())


@pytest.mark.parametrize("sync_free", [False, True])  # bincount (a CPU's default) or histc (a GPU's: no host sync)
def test_a_histogram_in_lanes_equals_bincount_and_ignores_digits_outside(sync_free):
    from trainer_plugins_sparse.pruning import _histogram

    generator = torch.Generator().manual_seed(0)
    for length in (1001, 1024):  # 1001: no lane count divides it, one lane
        values = torch.randint(0, 5, (length,), generator=generator, dtype=torch.int32)
        values[::7] = 256  # the last bin
        outside = values.clone()
        outside[1::5], outside[2::5] = -1, 257  # digits outside the prefix are -1 or `bins`: not counted
        for lanes in (1, 2, 16):
            assert torch.equal(_histogram(values.clone(), 257, lanes, sync_free), torch.bincount(values, minlength=257))
            expected = torch.bincount(outside[(outside >= 0) & (outside < 257)], minlength=257)
            assert torch.equal(_histogram(outside.clone(), 257, lanes, sync_free), expected)
    with pytest.raises(ValueError, match="lanes must be a power of two"):
        pruner(weights((4, 4)), lanes=3)


class CountingComm(Comm):
    """One process, counting the collectives: one per radix pass, plus one for the live counts."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def all_reduce(self, tensor):
        self.calls += 1
        return tensor


@pytest.mark.parametrize("digit_bits", [None, 8, 11])
@pytest.mark.parametrize("dtype, passes", [(torch.float32, {None: 3, 8: 4, 11: 3}),
                                           (torch.bfloat16, {None: 2, 8: 2, 11: 2}),
                                           (torch.float16, {None: 2, 8: 3, 11: 2})])
def test_half_precision_weights_need_fewer_passes_for_the_same_selection(dtype, passes, digit_bits):
    """bf16/fp16 magnitudes end in zero bits as float32: the select skips them. Ties (frequent in bf16) are kept
    in the order of the weights and positions, as a stable sort of all scores would."""
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in weights((16, 24), (40, 8), (5, 7))]
    scores = torch.cat([p.detach().abs().float().view(-1) for p in params])
    n_keep = keep_count(scores.numel(), 0.37)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    comm = CountingComm()
    pruner(params, digit_bits=digit_bits, comm=comm).prune(keep(0.37))
    after = torch.cat([p.detach().view(-1) for p in params])
    assert torch.equal(after != 0, expected)
    assert comm.calls - 1 == passes[digit_bits]


def test_layer_scope_prunes_each_weight_to_the_fraction():
    params = weights((16, 24), (40, 8), (5, 7))
    pruner(params, scope="layer").prune(keep(0.6))
    for p in params:
        assert int((p != 0).sum()) == keep_count(p.numel(), 0.6)
        live = p.detach().abs()[p != 0]
        assert live.min() >= p.detach().abs()[p == 0].max()  # zeros were the smallest


@pytest.mark.parametrize("digit_bits", [None, 8, 11])
def test_ties_at_the_threshold_are_broken_by_position_to_the_exact_count(digit_bits):
    p = torch.nn.Parameter(torch.ones(10, 10, dtype=torch.bfloat16))
    p.data[0, :3] = 2.0
    pruner([p], digit_bits=digit_bits).prune(keep(0.55))
    flat = p.detach().view(-1)
    assert int((flat != 0).sum()) == 45
    assert torch.equal(flat != 0, torch.arange(100) < 45)  # the 2.0s and the first 42 ones
    # across weights: ties are kept in the weights' order
    a, b = (torch.nn.Parameter(torch.ones(4, 5)) for _ in range(2))
    pruner([a, b], digit_bits=digit_bits).prune(keep(0.7))  # keep 12 of 40 equal weights
    assert int((a != 0).sum()) == 12 and int((b != 0).sum()) == 0


def test_masks_only_shrink_and_random_scores_are_seeded():
    params = weights((30, 30))
    first = pruner(params, score="random", seed=3)
    first.prune(keep(0.3), event=1)
    zeros1 = params[0].detach() == 0
    first.prune(keep(0.6), event=2)
    zeros2 = params[0].detach() == 0
    assert bool((zeros2 | ~zeros1).all()) and int(zeros2.sum()) == 900 - keep_count(900, 0.6)
    again = weights((30, 30))
    second = pruner(again, score="random", seed=3)
    second.prune(keep(0.3), event=1)
    second.prune(keep(0.6), event=2)
    assert torch.equal(again[0].detach() == 0, zeros2)
    # random, not magnitude: some of the largest weights went
    magnitude = weights((30, 30))
    pruner(magnitude).prune(keep(0.6))
    assert not torch.equal(magnitude[0].detach() == 0, zeros2)
    first.prune(keep(0.5))  # lower than what is pruned: nothing to do
    assert torch.equal(params[0].detach() == 0, zeros2)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_two_four_keeps_the_top_two_of_every_four(sparsity):
    params = weights((12, 16), (8, 8))
    pruner(params, n_m=(2, 4)).prune(keep(sparsity))
    for p in params:
        groups = (p.detach() != 0).view(-1, 4).sum(1)
        assert int(groups.min()) >= 2
        if sparsity == 0.5:
            assert bool((groups == 2).all())
    total = sum(p.numel() for p in params)
    assert sum(int((p != 0).sum()) for p in params) == keep_count(total, sparsity)


def test_gradients_and_adamw_moments_of_pruned_weights_stay_zero_with_weight_decay():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
    params = [net[0].weight, net[2].weight]
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    active = {"on": False}
    mask_gradients(params, lambda: active["on"])
    prune = pruner(params, optimizer=opt)

    def step():
        opt.zero_grad()
        net(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()

    for _ in range(3):
        step()  # moments exist and are non-zero everywhere
    prune.prune(keep(0.5))
    active["on"] = True
    zeros = [p.detach() == 0 for p in params]
    for p, z in zip(params, zeros):
        assert all(bool((s.view(-1)[z.view(-1)] == 0).all()) for s in state_like(opt, p))
    for _ in range(5):
        step()
        for p, z in zip(params, zeros):
            assert bool((p.detach()[z] == 0).all()) and bool((p.grad[z] == 0).all())
            assert bool((p.detach()[~z] != 0).all())
    assert prune.sparsity() == pytest.approx(0.5, abs=1 / 320)


def test_zero_keep_prunes_everything_and_bad_options_are_refused():
    params = weights((4, 4))
    pruner(params).prune(lambda numel: 0)
    assert int((params[0] != 0).sum()) == 0
    with pytest.raises(ValueError):
        pruner(weights((4, 6)), n_m=(2, 4))
    with pytest.raises(ValueError):
        pruner(weights((4, 4)), scope="row")


def test_two_four_check_for_semi_structured_inference():
    from trainer_plugins_sparse.inference import is_n_m, to_semi_structured

    params = weights((8, 16))
    assert not is_n_m(params[0].detach())
    pruner(params, n_m=(2, 4)).prune(keep(0.5))
    assert is_n_m(params[0].detach()) and not is_n_m(torch.ones(4, 6))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA GPU"):
            to_semi_structured(torch.nn.Linear(4, 4))
