"""trainer_plugins.zero: where each parameter's elements sit in DeepSpeed ZeRO's flat partitions (one process
here; two processes with weights cut between ranks: tests/plugins/test_apollo_zero.py)."""

import pytest
import torch


def engine(stage):
    import deepspeed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False))
    opt = torch.optim.SGD([{"params": [net[0].weight, net[1].weight]}, {"params": [net[0].bias]}], lr=0.1)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    return eng, net


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_pieces_hold_each_parameter_once(stage, deepspeed_env):
    import deepspeed

    from trainer_plugins.zero import Span, zero_layout

    eng, net = engine(stage)
    layout = zero_layout(eng)
    assert (layout.stage, layout.rank, layout.world_size) == (stage, 0, 1)
    assert [s.group_index for s in layout.shards] == [0, 1]
    with deepspeed.zero.GatheredParameters(list(net.parameters()), enabled=stage == 3):
        full = {id(p): p.detach().clone().reshape(-1) for p in net.parameters()}
    seen = {}
    for shard, piece in layout.pieces():
        assert piece.shape == tuple(getattr(piece.param, "ds_shape", piece.param.shape))
        assert (piece.start, piece.stop) == (0, full[id(piece.param)].numel())  # one process holds all
        torch.testing.assert_close(piece.view(shard.tensor.detach()), full[id(piece.param)])
        assert shard.spans(piece.param) == (Span(0, 0, piece.stop),)
        seen[id(piece.param)] = seen.get(id(piece.param), 0) + 1
    assert seen == {id(p): 1 for p in net.parameters()}


def test_not_a_zero_optimizer():
    from trainer_plugins.zero import zero_layout

    with pytest.raises(TypeError, match="no DeepSpeed ZeRO optimizer"):
        zero_layout(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
