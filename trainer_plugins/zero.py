"""Where each model parameter lives inside DeepSpeed ZeRO's flat optimizer partitions.

Under ZeRO-1/2/3 the optimizer never sees a model parameter: each ``step()`` gets one flat 1-D fp32
tensor per parameter group (ZeRO-1/2) or sub-group (ZeRO-3) holding this rank's slice of the
concatenated parameters. A method that needs a weight's shape (APOLLO's projections, masks of a
pruning schedule) must know which elements of which parameter each flat tensor holds, and which
other ranks hold the rest. ``zero_layout`` reads that from DeepSpeed's optimizer once, checks it
against the actual values, and describes it in plain terms:

- a ``Span`` is a contiguous run of one parameter's flattened (row-major) elements held by one rank;
- a ``Piece`` is the span this rank holds, with its offset in the flat tensor;
- a ``Shard`` is one flat tensor with its pieces, and the full list of parameters it covers across
  ranks (the same list, in the same order, on every rank: collectives are built from it).

Only DeepSpeed's public-ish bookkeeping is read (the attributes its own checkpoint code uses); the
values check in ``zero_layout`` turns a silent layout change in a future DeepSpeed into an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Span:
    rank: int
    start: int  # first element held (index into the flattened parameter)
    stop: int  # one past the last


@dataclass(frozen=True)
class Piece:
    param: torch.Tensor  # the model parameter (ZeRO-3: partitioned; use ``shape``, not param.shape)
    shape: tuple[int, ...]
    start: int
    stop: int
    offset: int  # where element ``start`` sits in the shard's flat tensor

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The piece's elements inside ``flat`` (the shard's tensor, its grad, or a state like it)."""
        return flat.narrow(0, self.offset, self.numel)


@dataclass
class Shard:
    tensor: torch.Tensor  # the flat fp32 partition the optimizer steps
    group_index: int  # index of the client optimizer's param group it belongs to
    pieces: list[Piece]  # what this rank holds, in flat order
    params: list[tuple[torch.Tensor, tuple[int, ...], tuple[Span, ...]]]  # all ranks: (param, shape, spans)
    process_group: object = None

    def spans(self, param: torch.Tensor) -> tuple[Span, ...]:
        for p, _, spans in self.params:
            if p is param:
                return spans
        raise KeyError("parameter not in this shard")


@dataclass
class ZeroLayout:
    stage: int
    rank: int
    world_size: int
    shards: list[Shard] = field(default_factory=list)

    def shard(self, flat: torch.Tensor) -> Shard | None:
        for s in self.shards:
            if s.tensor is flat:
                return s
        return None

    def pieces(self):
        for shard in self.shards:
            for piece in shard.pieces:
                yield shard, piece


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its data is then an empty tensor)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's element count, also when ZeRO-3 has partitioned it."""
    return int(getattr(param, "ds_numel", None) or param.numel())


def zero_optimizer(obj):
    """The DeepSpeed ZeRO optimizer inside a DeepSpeed engine, an accelerate wrapper, or itself; else None."""
    seen = 0
    while obj is not None and seen < 5:
        name = type(obj).__name__
        if name.startswith("DeepSpeedZeroOptimizer"):
            return obj
        obj = getattr(obj, "optimizer", None)
        seen += 1
    return None


def zero_layout(engine_or_optimizer) -> ZeroLayout:
    """The layout of the ZeRO optimizer inside ``engine_or_optimizer`` (stage 1, 2 or 3)."""
    zero = zero_optimizer(engine_or_optimizer)
    if zero is None:
        raise TypeError(f"no DeepSpeed ZeRO optimizer in {type(engine_or_optimizer).__name__}")
    if type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        layout = _stage3_layout(zero)
    else:
        layout = _stage12_layout(zero)
    _check_values(layout)
    return layout


def _rank_and_size(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _stage12_layout(zero) -> ZeroLayout:
    stage = 2 if getattr(zero, "partition_gradients", True) else 1
    layout = None
    for i, params in enumerate(zero.round_robin_bit16_groups):
        group = zero.real_dp_process_group[i]
        rank, world = _rank_and_size(group)
        if layout is None:
            layout = ZeroLayout(stage=stage, rank=rank, world_size=world)
        sizes = [t.numel() for t in zero.parallel_partitioned_bit16_groups[i]]
        bounds = [sum(sizes[:r]) for r in range(world + 1)]
        offsets = zero.round_robin_bit16_offsets[i]
        metas = zero.round_robin_bit16_meta[i]
        shard = Shard(tensor=zero.single_partition_of_fp32_groups[i], group_index=i, pieces=[], params=[],
                      process_group=group)
        for param, offset, meta in zip(params, offsets, metas):
            numel, shape = meta.numel(), tuple(meta.shape)
            spans = []
            for r in range(world):
                lo, hi = max(offset, bounds[r]), min(offset + numel, bounds[r + 1])
                if lo < hi:
                    spans.append(Span(r, lo - offset, hi - offset))
                    if r == rank:
                        shard.pieces.append(Piece(param, shape, lo - offset, hi - offset, lo - bounds[r]))
            shard.params.append((param, shape, tuple(spans)))
        layout.shards.append(shard)
    if layout is None:
        raise ValueError("the ZeRO optimizer has no parameter groups")
    return layout


def _stage3_layout(zero) -> ZeroLayout:
    layout = None
    for k, params in enumerate(zero.fp16_groups):
        group = zero.sub_group_process_groups[k] if hasattr(zero, "sub_group_process_groups") else zero.dp_process_group
        rank, world = _rank_and_size(group)
        if layout is None:
            layout = ZeroLayout(stage=3, rank=rank, world_size=world)
        shard = Shard(tensor=zero.fp32_partitioned_groups_flat[k], group_index=zero.sub_group_to_group_id[k],
                      pieces=[], params=[], process_group=group)
        offset = 0
        for param in params:
            # ZeRO-3 pads each parameter to a multiple of the world size and gives rank r the
            # r-th equal slice; the padding sits at the end of the last ranks' slices.
            size = param.ds_tensor.ds_numel
            numel, shape = param.ds_numel, tuple(param.ds_shape)
            spans = []
            for r in range(world):
                lo, hi = r * size, min((r + 1) * size, numel)
                if lo < hi:
                    spans.append(Span(r, lo, hi))
                    if r == rank:
                        shard.pieces.append(Piece(param, shape, lo, hi, offset))
            shard.params.append((param, shape, tuple(spans)))
            offset += size
        layout.shards.append(shard)
    if layout is None:
        raise ValueError("the ZeRO optimizer has no parameter groups")
    return layout


def _check_values(layout: ZeroLayout) -> None:
    """Each piece must hold the values of its parameter's elements (the fp32 master copy starts as a
    copy of the model weights). Checked on a few elements per piece, cheaply, at attach time."""
    for shard, piece in layout.pieces():
        flat = piece.view(shard.tensor.detach())
        model = _param_elements(piece)
        if model is None:
            continue
        probe = torch.linspace(0, piece.numel - 1, steps=min(piece.numel, 8)).long()
        if not torch.allclose(flat[probe].float(), model[probe].float(), rtol=1e-2, atol=1e-6):
            raise RuntimeError(
                "DeepSpeed's ZeRO partition layout is not the one trainer_plugins.zero expects (this DeepSpeed "
                "version may have changed it); please report it with your DeepSpeed version")


def _param_elements(piece: Piece) -> torch.Tensor | None:
    p = piece.param
    if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's slice of the parameter, then padding
        local = p.ds_tensor.detach().view(-1)
        size = p.ds_tensor.ds_numel
        return local.narrow(0, piece.start - (piece.start // size) * size, piece.numel)
    data = p.detach().reshape(-1)
    if data.numel() != p.numel() or data.numel() < piece.stop:
        return None  # storage swapped out (offload): nothing to compare with
    return data.narrow(0, piece.start, piece.numel)
