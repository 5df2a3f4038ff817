"""The APOLLO optimizer alone (plain torch): parity with apollo-torch, exact resume, state format."""

import io
import itertools
import sys

import pytest
import torch

from trainer_plugins_apollo.optimizer import APOLLO, apollo_param_groups, state_bytes

SHAPES = [(24, 40), (40, 24), (32, 32)]  # m < n, m > n, square


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    bias = torch.nn.Parameter(torch.randn(40, generator=g))
    return mats, bias


def groups(mats, bias, **kw):
    return [{"params": [bias], "weight_decay": 0.01},
            {"params": mats, "rank": kw.get("rank", 4), "update_proj_gap": 10, "scale": kw.get("scale", 1.0),
             "scale_type": kw.get("scale_type", "channel"), "proj": "random", "proj_type": "std",
             "weight_decay": 0.1}]


def feed(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


CASES = list(itertools.product(["channel", "tensor"], [True, False], [False, True]))


@pytest.mark.parametrize("scale_type, limiter, scale_front", CASES)
def test_parity_with_apollo_torch(scale_type, limiter, scale_front):
    from apollo_torch import APOLLOAdamW

    rank, scale = (4, 2.0) if scale_type == "channel" else (1, 128.0)
    ours_m, ours_b = make_params()
    ref_m, ref_b = make_params()
    ours = APOLLO(groups(ours_m, ours_b, rank=rank, scale=scale, scale_type=scale_type), lr=1e-3,
                  scale_front=scale_front, norm_growth_limiter=limiter)
    ref = APOLLOAdamW(groups(ref_m, ref_b, rank=rank, scale=scale, scale_type=scale_type), lr=1e-3,
                      scale_front=scale_front, disable_nl=not limiter)
    for step in range(60):  # 6 projection windows
        feed(ours_m + [ours_b], step)
        feed(ref_m + [ref_b], step)
        ours.step()
        ref.step()
    for a, b in zip(ours_m + [ours_b], ref_m + [ref_b]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the runs really moved, so the comparison means something
    assert (ours_m[0] - make_params()[0][0]).abs().max() > 1e-2


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_a_weight_whose_first_gradients_are_zero_still_trains(scale_type):
    """LoRA's A gets zero gradients while B is still zero, an MoE expert while no token reaches it. apollo-torch's
    limiter takes that zero as its reference and holds the weight near 1e-8 x 1.01^t for good; ours lets the
    first nonzero update through, and a zero step later in the run keeps the reference it had."""
    from apollo_torch import APOLLOAdamW

    rank, scale = (4, 2.0) if scale_type == "channel" else (1, 128.0)

    def train(optimizer_class, silent_steps, **kw):
        mats, bias = make_params()
        start = [m.detach().clone() for m in mats]
        param_groups = groups(mats, bias, rank=rank, scale=scale, scale_type=scale_type)
        param_groups[1]["weight_decay"] = 0.0  # only the update moves the weights
        opt = optimizer_class(param_groups, lr=1e-3, **kw)
        references = []
        for step in range(20):
            feed(mats + [bias], step)
            if step in silent_steps:
                mats[0].grad.zero_()
            opt.step()
            references.append(opt.state[mats[0]].get("limiter_norm"))
        return [float((m.detach() - s).norm()) for m, s in zip(mats, start)], references

    ours, _ = train(APOLLO, silent_steps={0, 1})
    theirs, _ = train(APOLLOAdamW, silent_steps={0, 1})
    undisturbed, _ = train(APOLLO, silent_steps=set())
    assert theirs[0] < 1e-5 < undisturbed[0]  # the freeze this guards against
    assert ours[0] > 0.5 * undisturbed[0]
    assert ours[1:] == pytest.approx(theirs[1:], rel=1e-5)  # other weights: apollo-torch's numbers
    _, references = train(APOLLO, silent_steps={10})
    assert torch.equal(references[10], references[9]) and references[9] > 0


def test_the_projection_never_exceeds_a_weights_smaller_side():
    """A LoRA A (r x n) under APOLLO rank 256, or a small k_proj: apollo-torch projects the smaller side up to the
    rank, so its moments outgrow Adam's. Ours caps the projection at that side: never more state than Adam."""
    from apollo_torch import APOLLOAdamW

    def state_numel(optimizer_class, rank):
        g = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 40), (40, 6), (32, 32)]]
        opt = optimizer_class([{"params": weights, "rank": rank, "update_proj_gap": 10, "scale": 1.0,
                                "scale_type": "channel", "proj": "random", "proj_type": "std"}], lr=1e-3)
        before = [w.detach().clone() for w in weights]
        for step in range(3):
            feed(weights, step)
            opt.step()
        assert all(not torch.equal(w, b) for w, b in zip(weights, before))
        return [sum(t.numel() for k, t in opt.state[w].items() if k in ("exp_avg", "exp_avg_sq")) for w in weights]

    assert state_numel(APOLLO, 16) == [2 * 4 * 40, 2 * 40 * 6, 2 * 32 * 16]  # capped at 4 and 6; 16 < 32
    assert state_numel(APOLLOAdamW, 16) == [2 * 16 * 40, 2 * 40 * 16, 2 * 32 * 16]  # what the cap avoids
    assert state_numel(APOLLO, 4) == state_numel(APOLLOAdamW, 4)  # below every side: the same


def run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        feed(params, step)
        opt.step()


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_resume_is_bit_identical_across_a_refresh(scale_type):
    full_m, full_b = make_params()
    full = APOLLO(groups(full_m, full_b, scale_type=scale_type), lr=1e-3)
    run(full, full_m + [full_b], 20)

    cut_m, cut_b = make_params()
    cut = APOLLO(groups(cut_m, cut_b, scale_type=scale_type), lr=1e-3)
    run(cut, cut_m + [cut_b], 13)  # mid-window: the next refresh is at step 20... and 10 was crossed
    buf = io.BytesIO()
    torch.save({"opt": cut.state_dict(), "params": [p.detach().clone() for p in cut_m + [cut_b]]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # only tensors and plain values in the state

    new_m, new_b = make_params(seed=7)  # fresh objects, different values, then the saved ones
    with torch.no_grad():
        for p, v in zip(new_m + [new_b], saved["params"]):
            p.copy_(v)
    resumed = APOLLO(groups(new_m, new_b, scale_type=scale_type), lr=1e-3)
    resumed.load_state_dict(saved["opt"])
    run(resumed, new_m + [new_b], 7, start=13)
    for a, b in zip(full_m + [full_b], new_m + [new_b]):
        assert torch.equal(a, b)


def test_state_is_plain_data():
    mats, bias = make_params()
    opt = APOLLO(groups(mats, bias), lr=1e-3)
    run(opt, mats + [bias], 3)

    def walk(x):
        if isinstance(x, dict):
            return all(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(walk(v) for v in x)
        return isinstance(x, (torch.Tensor, int, float, bool, str, type(None)))

    assert walk(opt.state_dict())


PACKED_CASES = [("tensor", True, False), ("tensor", True, True), ("tensor", False, False), ("channel", True, False),
                ("channel", False, False)]


@pytest.mark.parametrize("scale_type, limiter, scale_front", PACKED_CASES)
@pytest.mark.parametrize("skips", [False, True], ids=["every-step", "skipped-steps"])
def test_packed_step_equals_the_per_weight_path(monkeypatch, scale_type, limiter, scale_front, skips):
    """A group's weights step together, their state packed by the shape of R; the result must be bit for bit
    the per-weight path's (taken when weights differ in dtype or device). With skipped steps one weight goes
    without a gradient now and then (an MoE expert no token reached): its step count and limiter lag the
    others', and the packed state is rebuilt when the set of weights changes."""
    from trainer_plugins_apollo import optimizer as apollo_optimizer

    shapes = SHAPES + [(24, 40), (40, 24), (40, 24)]  # shapes of R shared by several weights

    def train(packed):
        monkeypatch.setattr(apollo_optimizer, "_packable", lambda params: packed)
        g = torch.Generator().manual_seed(0)
        mats = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        bias = torch.nn.Parameter(torch.randn(40, generator=g))
        rank, scale = (1, 128.0) if scale_type == "tensor" else (4, 2.0)
        opt = APOLLO(groups(mats, bias, rank=rank, scale=scale, scale_type=scale_type), lr=1e-3,
                     norm_growth_limiter=limiter, scale_front=scale_front)
        for step in range(25):
            feed(mats + [bias], step)
            if skips and (step < 2 or step % 3 == 0):
                mats[3].grad = None
            opt.step()
        return mats + [bias], opt.state_dict()

    (packed, packed_state), (looped, looped_state) = train(True), train(False)
    for a, b in zip(packed, looped):
        assert torch.equal(a, b)
    assert packed_state["state"].keys() == looped_state["state"].keys()
    for key, state in looped_state["state"].items():
        assert state.keys() == packed_state["state"][key].keys()
        for name, value in state.items():
            other = packed_state["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    if skips:
        assert looped_state["state"][4]["step"] == 15 and looped_state["state"][5]["step"] == 25


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_packed_state_keeps_nothing_dead_alive_when_the_set_of_weights_changes(scale_type):
    """An MoE step trains the experts its tokens reached: the packed state is rebuilt for each new set of weights.
    The state must then hold no more memory than its own tensors (no row of an old pack kept alive by a view)
    and save to the same size."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(24, 40, generator=g)) for _ in range(6)]
    rank = 1 if scale_type == "tensor" else 4
    opt = APOLLO([{"params": mats, "rank": rank, "scale_type": scale_type}], lr=1e-3)
    for step in range(20):
        feed(mats, step)
        mats[step % 6].grad = None  # a different weight sits out each step
        opt.step()
    tensors = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(held.values()) == state_bytes(opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    assert len(buf.getvalue()) < state_bytes(opt) + 20_000  # the tensors' bytes and the pickled structure


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_layerwise_batches_equal_the_plain_step_and_bound_the_live_gradients(batch):
    """Layer-wise mode updates every ``batch`` weights as backward completes their gradients, and the rest when
    backward ends: at most ``batch`` weights' gradients are alive at once, none is left for step(), and the
    updates are the plain optimizer's."""
    from trainer_plugins_apollo.optimizer import register_layerwise_hooks

    live = []  # gradients alive whenever a hook hands a weight over

    class Counting(APOLLO):
        def queue_parameter(self, p, batch):
            live.append(sum(q.grad is not None for q in layerwise.parameters()))
            super().queue_parameter(p, batch)

    def model_and_optimizer(optimizer_class=APOLLO):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16 + i, 17 + i) for i in range(5)])
        weights = [m.weight for m in model]
        biases = [m.bias for m in model]
        return model, weights, optimizer_class([{"params": biases}, {"params": weights, "rank": 1, "scale": 128.0,
                                                "scale_type": "tensor", "update_proj_gap": 3}], lr=1e-2,
                                               weight_decay=0.1)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    plain, plain_weights, plain_opt = model_and_optimizer()
    layerwise, _, opt = model_and_optimizer(Counting)
    register_layerwise_hooks(layerwise.parameters(), opt, batch=batch)
    for step in range(8):  # crosses two projection refreshes
        plain(x).square().mean().backward()
        plain_opt.step()
        plain_opt.zero_grad()
        layerwise(x).square().mean().backward()
        assert all(p.grad is None for p in layerwise.parameters())  # updated inside backward
        opt.step()  # nothing left to do
    assert max(live) == min(batch, 10)
    for a, b in zip(plain.parameters(), layerwise.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(plain_weights[0], model_and_optimizer()[1][0])


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_no_host_sync_in_step(monkeypatch, scale_type):
    mats, bias = make_params()
    opt = APOLLO(groups(mats, bias, scale_type=scale_type), lr=1e-3)
    run(opt, mats + [bias], 1)

    def guard(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *a, **k):
            caller = sys._getframe(1).f_code.co_name
            # next_seed reads a CPU generator's output at each refresh: CPU-only, never a device sync
            if caller != "next_seed":
                raise AssertionError(f"Tensor.{name} (a host sync on a GPU) called from {caller}")
            return original(self, *a, **k)

        return guarded

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    for step in range(1, 12):  # crosses the refresh at step 10
        feed(mats + [bias], step)
        opt.step()


def test_memory_is_low_rank():
    w = torch.nn.Parameter(torch.randn(64, 200))
    mini = APOLLO([{"params": [w], "rank": 1, "scale_type": "tensor", "scale": 128.0}])
    w.grad = torch.randn_like(w)
    mini.step()
    assert state_bytes(mini) == 4 * (2 * 200 + 1)  # two 1 x 200 moments + the limiter norm
    w2 = torch.nn.Parameter(torch.randn(200, 64))
    apollo = APOLLO([{"params": [w2], "rank": 8}], norm_growth_limiter=False)
    w2.grad = torch.randn_like(w2)
    apollo.step()
    assert state_bytes(apollo) == 4 * 2 * 8 * 200


@pytest.mark.parametrize("bad, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2, "scale_type": "row"}, "scale_type must be one of"),
    ({"rank": 2, "proj": "svd"}, "proj must be 'random'"),
    ({"rank": 2, "proj_type": "left"}, "proj_type must be 'std'"),
    ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
    ({"rank": 2, "scale": -1.0}, "scale must be > 0"),
])
def test_bad_groups(bad, message):
    with pytest.raises(ValueError, match=message):
        APOLLO([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], **bad}])


def test_param_groups():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    gs = apollo_param_groups(model.named_parameters(), lambda n, p: n.startswith("0."), weight_decay=0.1,
                             no_decay=lambda n: "bias" in n or n.startswith("1."), rank=2)
    assert [len(g["params"]) for g in gs] == [1, 4, 1]
    assert gs[2]["rank"] == 2 and gs[2]["params"][0] is model[0].weight and gs[1]["weight_decay"] == 0.0


def test_flat_partition_without_layout_is_an_error_not_silent_adamw():
    """What ZeRO hands the optimizer when nobody told APOLLO the layout: refuse, never fall back to AdamW."""
    flat = torch.nn.Parameter(torch.randn(12))
    opt = APOLLO([{"params": [flat], "rank": 1, "scale_type": "tensor"}], lr=0.1)
    flat.grad = torch.randn(12)
    with pytest.raises(RuntimeError, match="attach_zero"):
        opt.step()
