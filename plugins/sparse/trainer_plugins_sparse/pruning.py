"""Gradual magnitude pruning of a set of weights, in plain torch (no Trainer import).

The mask *is* the weights' zeros: a pruned weight is exactly 0, its gradient is zeroed by a hook
before it reaches the optimizer (or DDP's all-reduce, or ZeRO's reduce-scatter), and at each prune
event its optimizer moments are zeroed, so AdamW (decoupled weight decay), SGD, Lion, Adafactor and
APOLLO all keep it at 0: zero gradient and zero state give a zero update. No mask tensors are stored
(1 byte per weight saved), and a checkpoint's weights carry the masks, so resume is exact.

Selection is exact: the ``n_keep`` highest scores survive, ties at the threshold broken by position.
The threshold comes from a radix select over the float32 bit patterns of the scores (non-negative
floats sort like their bits): three passes, each a histogram of the next 11-bit digit among
the scores that share the digits chosen so far (two for bf16 or fp16 weights, whose magnitudes end in 16 or 13
zero bits as float32). Only one weight's scores exist at a time, and under
ZeRO-3 each rank scores the slices it holds and the histograms are summed across ranks: a distributed
k-th value without gathering any weight. A prune event syncs with the host a fixed number of times,
not per weight (on a GPU the histograms are torch.histc's, which unlike torch.bincount does not sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

class Comm:
    """Sums across the ranks that hold slices of the pruned weights; a no-op when they are all local."""

    def __init__(self, group=None, distributed: bool = False):
        self.group, self.distributed = group, distributed

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group)
        return tensor

    def ranks_before(self, value: int, device) -> int:
        """Sum of ``value`` over the ranks before this one (tie-breaking order)."""
        if not self.distributed:
            return 0
        import torch.distributed as dist

        mine = torch.tensor([value], dtype=torch.int64, device=device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, mine, group=self.group)
        return int(sum(t.item() for t in every[: dist.get_rank(self.group)]))


@dataclass
class Target:
    """One prunable weight. ``local`` is the 1-D run of its elements this rank scores: the whole
    flattened weight, or (ZeRO-3) this rank's slice ``[start, stop)`` of it. ``copies()`` returns the
    other 1-D tensors holding the same elements (an fp32 master slice, a partitioned bf16 slice,
    optimizer moments) that must become 0 with it, each as ``(tensor, offset)``: the tensor holds
    ``local``'s elements ``[offset, offset + len)``. It is called at each prune event, as optimizer
    state appears only after the first step."""

    name: str
    param: torch.nn.Parameter
    shape: tuple[int, ...]
    local: torch.Tensor
    start: int = 0
    copies: Callable[[], list[tuple[torch.Tensor, int]]] = field(default=lambda: [])

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def whole(self) -> bool:
        return self.local.numel() == self.numel


class Pruner:
    """Prunes ``targets`` to a sparsity, globally (one threshold) or per weight (``scope='layer'``).

    score:  'magnitude' (|w|) or 'random' (uniform scores on the live weights: the ablation).
    n_m:    (n, m): the n largest of every m consecutive weights along a row are never pruned (2:4).
    after:  called on every rank after each ``prune`` (ZeRO-3 refreshes the weights it keeps whole).
    digit_bits: bits per pass of the threshold's radix select (None: 8 on a GPU, 11 elsewhere; see ``_threshold``).
    lanes:      sub-histograms per bin (None: 16 on a GPU, 1 elsewhere; see ``_histogram``).
    """

    sync_free: bool | None = None  # how histograms count (None: histc on a GPU; see _histogram); for measurements

    def __init__(self, targets: Sequence[Target], scope: str = "global", score: str = "magnitude",
                 n_m: tuple[int, int] | None = None, seed: int = 0, comm: Comm | None = None,
                 after: Callable[[], None] | None = None, digit_bits: int | None = None, lanes: int | None = None):
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        if score not in ("magnitude", "random"):
            raise ValueError(f"score must be 'magnitude' or 'random', got {score!r}")
        self.targets, self.scope, self.score, self.n_m, self.seed = list(targets), scope, score, n_m, seed
        self.comm, self.after, self.digit_bits, self.lanes = comm or Comm(), after, digit_bits, lanes
        self.total = sum(t.numel for t in self.targets)
        if lanes is not None and (lanes < 1 or lanes & (lanes - 1)):
            raise ValueError(f"lanes must be a power of two, got {lanes}")
        if n_m is not None:
            for t in self.targets:
                if not t.whole or t.shape[-1] % n_m[1]:
                    raise ValueError(f"{t.name}: {n_m[0]}:{n_m[1]} needs whole rows divisible by {n_m[1]}")

    # -- what is pruned now -------------------------------------------------------------------------
    def zeros(self) -> list[int]:
        """Pruned (zero) weights per target, summed over ranks."""
        counts = torch.stack([(t.local == 0).sum() for t in self.targets]).to(torch.int64)
        return self.comm.all_reduce(counts).tolist()

    def sparsity(self) -> float:
        return sum(self.zeros()) / max(self.total, 1)

    # -- pruning ------------------------------------------------------------------------------------
    def prune(self, keep: Callable[[int], int], event: int = 0) -> None:
        """Keep ``keep(numel)`` weights (of all targets, or of each with scope 'layer'); zero the rest
        in every copy. Masks only shrink: a group already at or below its count is left alone.
        ``event`` seeds random scores. (``zeros()`` counts what is pruned.)"""
        groups = [list(range(len(self.targets)))] if self.scope == "global" else [[i] for i in range(len(self.targets))]
        zeros = self.zeros()
        for members in groups:
            numel = sum(self.targets[i].numel for i in members)
            n_keep = keep(numel)
            if numel - sum(zeros[i] for i in members) <= n_keep:
                continue
            self._prune_group(members, n_keep, event)
        if self.after is not None:
            self.after()

    def _scores(self, i: int, event: int) -> torch.Tensor:
        target = self.targets[i]
        w = target.local.detach()
        if self.score == "magnitude":
            scores = w.abs().float()
        else:
            generator = torch.Generator(device=w.device).manual_seed(self.seed * 1_000_003 + event * 7_919 + i)
            draw = torch.rand(target.numel, generator=generator, device=w.device)
            draw = draw.narrow(0, target.start, w.numel())
            scores = torch.where(w != 0, 1.0 - draw, torch.zeros_like(draw))  # (0, 1] alive, 0 pruned
        if self.n_m is not None:
            n, m = self.n_m
            rows = scores.view(-1, m)
            rows.scatter_(1, rows.topk(n, dim=1).indices, float("inf"))  # never pruned
        return scores.view(-1)

    def _prune_group(self, members: list[int], n_keep: int, event: int) -> None:
        device = self.targets[members[0]].local.device
        if n_keep == 0:
            threshold, ties, quotas = None, [0] * len(members), [0] * len(members)
        else:
            threshold, (kept_ties, ties) = self._threshold(members, n_keep, event)
            # ties at the threshold are kept in order: ranks first (rank 0's before rank 1's), then members
            quota = max(0, kept_ties - self.comm.ranks_before(sum(ties), device))
            quotas = []
            for count in ties:
                quotas.append(min(quota, count))
                quota -= quotas[-1]
        for i, quota, tied in zip(members, quotas, ties):
            target = self.targets[i]
            if threshold is None:
                drop = torch.ones_like(target.local, dtype=torch.bool)
            else:
                bits = _bits(self._scores(i, event))
                if quota == tied:  # all of this member's ties are kept (or it has none): no running count
                    drop = bits < threshold
                elif quota == 0:
                    drop = bits <= threshold
                else:
                    tie = bits == threshold
                    drop = (bits < threshold) | (tie & (torch.cumsum(tie, 0) > quota))
            with torch.no_grad():
                target.local.masked_fill_(drop, 0)
                for tensor, offset in target.copies():
                    tensor.masked_fill_(drop.narrow(0, offset, tensor.numel()).to(tensor.device), 0)

    def _threshold(self, members: list[int], n_keep: int, event: int) -> tuple[int, tuple[int, list[int]]]:
        """The score bits of the ``n_keep``-th highest score of the group, and its ties: how many of them are
        kept (over all ranks) and how many each member holds on this rank. A radix select over the 31 bits
        of non-negative float32 scores, ``digit_bits`` per pass: each pass is one histogram per weight of the
        next digit among the scores under the prefix chosen so far, and one host sync for the whole group
        (``_histogram`` itself never syncs). 8 bits in 16 lanes on a GPU (lanes spread the atomic adds on the
        few hot bins: the weights share a few exponents, and on an H200 that contention was 2/3 of a prune
        event), 11 bits in one lane elsewhere (fewer passes)."""
        device = self.targets[members[0]].local.device
        gpu = device.type == "cuda"
        width = self.digit_bits or (8 if gpu else 11)
        lanes = self.lanes or (16 if gpu else 1)
        bins = 1 << width
        low = self._zero_low_bits(members)  # every score's last bits are 0: no pass for them
        shifts = list(range(low, 31, width))[::-1]
        prefix, above = 0, 0
        for shift in shifts:
            per_member = []
            for i in members:
                digit = _bits(self._scores(i, event)) >> shift
                if shift != shifts[0]:  # the scores under the prefix: 0..bins-1; the others fall outside
                    digit = digit.sub_(prefix << width).clamp_(-1, bins)
                per_member.append(_histogram(digit, bins, lanes, self.sync_free))
            hist = self.comm.all_reduce(torch.stack(per_member).sum(0).to(device))
            digit_value, above_it = _bucket(hist.tolist(), n_keep - above)
            prefix, above = (prefix << width) | digit_value, above + above_it
        mine = torch.stack(per_member)[:, prefix & (bins - 1)].tolist()  # the last pass's bin of the threshold
        return prefix << low, (n_keep - above, mine)

    def _zero_low_bits(self, members: list[int]) -> int:
        """How many low bits of every member's float32 score are 0 whatever the weights hold: 16 for the
        magnitudes of bf16 weights, 13 for fp16 ones (their mantissas are 7 and 10 bits of float32's 23; the
        2:4 marks, inf, end in zeros too). Random scores and float32 weights use all 31 bits. The same on
        every rank (they hold slices of the same weights), so the passes, each a collective, stay in step."""
        if self.score != "magnitude":
            return 0
        return min(_ZERO_LOW_BITS.get(self.targets[i].local.dtype, 0) for i in members)


_ZERO_LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}


def _bits(scores: torch.Tensor) -> torch.Tensor:
    return scores.contiguous().view(torch.int32)


def _histogram(digits: torch.Tensor, bins: int, lanes: int = 1, sync_free: bool | None = None) -> torch.Tensor:
    """How many of ``digits`` (int32) hold each value 0..bins-1, as int64; values outside (-1, or bins and more)
    are not counted. With ``lanes``, element i adds to sub-histogram i % lanes and the lanes are summed: on a GPU,
    neighbouring threads then add to different counters even when their digits share a bin (a slice whose length
    ``lanes`` does not divide counts in one lane). On a GPU the count is torch.histc over the integers, which needs
    no host sync; torch.bincount reads the input's minimum and maximum back to the host first (two syncs per
    weight and pass). ``sync_free`` (default: on a GPU) picks histc (on a CPU over floats, for the tests); under
    torch.use_deterministic_algorithms (the Trainer's full_determinism) CUDA histc raises, so bincount counts."""
    if lanes > 1 and digits.numel() % lanes == 0:
        lane = torch.arange(lanes, device=digits.device, dtype=digits.dtype)
        digits = torch.add(lane, digits.view(-1, lanes), alpha=lanes).view(-1)  # -1 and bins stay outside
    else:
        lanes = 1
    n = bins * lanes
    if sync_free is None:
        sync_free = digits.is_cuda and not torch.are_deterministic_algorithms_enabled()
    if sync_free:
        # the range's top value is counted in the last bin (histc's last bin is closed): one bin more, dropped.
        # A CPU's histc takes floats only (exact here: the tests' counts stay far below 2**24)
        counts = torch.histc(digits if digits.is_cuda else digits.float(), bins=n + 1, min=0, max=n + 1)
        counts = counts[:n].long()
    else:
        counts = torch.bincount((digits + 1).clamp_(0, n + 1), minlength=n + 2)[1:n + 1]
    return counts.view(bins, lanes).sum(1) if lanes > 1 else counts


def _bucket(hist: list[int], k: int) -> tuple[int, int]:
    """Largest bin b with at least k entries at or above it, and the entries strictly above it."""
    above = 0
    for b in range(len(hist) - 1, -1, -1):
        if above + hist[b] >= k:
            return b, above
        above += hist[b]
    raise ValueError(f"fewer than {k} scores to select from")


# -- gradients and optimizer state ------------------------------------------------------------------
def mask_gradients(params: Sequence[torch.nn.Parameter], active: Callable[[], bool]) -> list:
    """Hooks that zero the gradient of every zero weight before it is accumulated (so before DDP's
    all-reduce and ZeRO's reduce-scatter, and before gradient clipping sees it). ``active()`` lets a
    dense phase skip the work. Returns the hook handles."""

    def hook_for(p):
        def hook(grad):
            if not active():
                return None
            if p.numel() != grad.numel():  # the weight is not materialised here: never skip silently
                raise RuntimeError("sparse: a gradient arrived for a weight that is not materialised on this "
                                   "rank, so its zeros (the mask) cannot be read")
            return grad.masked_fill(p.detach() == 0, 0)

        return hook

    return [p.register_hook(hook_for(p)) for p in params]


def local_targets(weights: dict, optimizer) -> list[Target]:
    """Targets over whole weights held by this process (no ZeRO partitioning): each weight's own flat view,
    with ``optimizer``'s per-element moments (state_like) as the copies zeroed with it."""
    return [Target(name, p, tuple(p.shape), p.detach().view(-1),
                   copies=lambda p=p: [(t, 0) for t in state_like(optimizer, p)]) for name, p in weights.items()]


def state_like(optimizer, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The per-element state of ``tensor`` in a torch optimizer (moments shaped like it), flattened.
    Other state (APOLLO's low-rank moments, step counts) has other shapes and is left alone: with a
    zero gradient it gives a zero update for the pruned elements anyway."""
    state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
    return [v.view(-1) for v in state.values() if torch.is_tensor(v) and v.dim() > 0 and v.shape == tensor.shape]
