"""APOLLO on DeepSpeed ZeRO's flat partitions (stages 1, 2 and 3).

ZeRO gives ``step()`` one flat tensor per group holding a contiguous run of the row-major
elements of several weights; a weight can be cut anywhere, mid-row included, between ranks (ZeRO-3
cuts every weight). The update only needs little communication (see trainer_plugins.zero for
the layout):

- m >= n: R = G P^T is row-local. A rank computes R for the rows it touches; a row cut between
  ranks gets partial sums on each, so those rows (one per cut) are all-reduced: r floats per cut.
- m < n: R = P^T G mixes all rows, so each rank holding part of the weight computes its partial
  r x n product and they all-reduce it. Every holder then keeps the full r x n moments (small).
- Tensor-wise norms of R and N and the norm of the update (limiter) are sums: one all-reduce of
  three scalars per cut weight. Each row of R is counted by one rank only (the one holding its
  first element), so shared rows are not counted twice.

So a step costs at most two all-reduces per shard, whatever the number of weights, and none for
weights held whole by one rank. The arithmetic is the single-process one (optimizer.py), with sums
split across ranks, so updates agree within fp32 rounding (tested with 2 processes, ZeRO-2 and -3).
"""

from __future__ import annotations

import math

import torch

from .optimizer import _adam_moments, _growth_limiter, _moments, _step_size, next_seed, projection, projection_rank


def step_shard(optimizer, group: dict, shard) -> None:
    """One APOLLO step of the flat tensor ``shard.tensor`` (a trainer_plugins.zero.Shard)."""
    flat, grad = shard.tensor, shard.tensor.grad
    state = optimizer.state[flat]
    state["step"] = state.get("step", 0) + 1
    step = state["step"]
    per_param = state.setdefault("params", {})  # global index in shard.params -> that weight's state
    held = {id(piece.param): piece for piece in shard.pieces}
    proj_rank = group["rank"]

    work = []  # the 2-D weights this rank holds part of
    dense = []
    for index, (param, shape, spans) in enumerate(shard.params):
        piece = held.get(id(param))
        if piece is None:
            continue
        if len(shape) != 2:
            dense.append((index, piece))
            continue
        work.append(_Weight(index, piece, shape, spans, grad))
    if dense:
        _adamw_pieces(group, per_param, dense, flat, grad, step)

    # R from this rank's elements
    for w in work:
        s = per_param.setdefault(w.index, {"seed": optimizer._first_seed.get(w.piece.param, 0)})
        if (step - 1) % group["update_proj_gap"] == 0 and step > 1:
            s["seed"] = next_seed(s["seed"])
        w.state = s
        p = _projection(optimizer, w.piece.param, w.shape, proj_rank, s["seed"], flat)
        if w.wide:  # m < n: P is m x r; this rank's rows of it
            w.r = p[w.row_lo:w.row_hi + 1].T @ w.g
        else:
            w.r = w.g @ p.T

    cut = [(i, param, shape, spans) for i, (param, shape, spans) in enumerate(shard.params)
           if len(shape) == 2 and len(spans) > 1]
    _reduce_shared_r(shard, cut, {w.index: w for w in work}, proj_rank, flat)

    # moments, on the full R rows/columns this rank needs
    for w in work:
        if "exp_avg" not in w.state:
            w.state["exp_avg"] = torch.zeros_like(w.r)
            w.state["exp_avg_sq"] = torch.zeros_like(w.r)
    if work:
        m, denom = _adam_moments(group, *_moments([w.state for w in work]), [w.r for w in work])
        normalized = torch._foreach_div(m, denom)
    else:
        normalized = []

    # scaling factors and the sums the limiter / tensor-wise norms need
    channel = group["scale_type"] == "channel"
    sums = {}
    for w, n in zip(work, normalized):
        if channel:
            dim = 0 if w.wide else 1
            factor = torch.linalg.vector_norm(n, dim=dim) / (torch.linalg.vector_norm(w.r, dim=dim) + 1e-8)
            g_sq = torch.linalg.vector_norm(w.g, dim=dim).square()
            w.factor = factor.unsqueeze(0) if w.wide else factor.unsqueeze(1)
            sums[w.index] = torch.stack([torch.zeros((), device=flat.device), torch.zeros((), device=flat.device),
                                         torch.sum(factor.square() * g_sq)])
        else:
            r_own, n_own = w.owned(w.r), w.owned(n)
            sums[w.index] = torch.stack([r_own.square().sum(), n_own.square().sum(), w.g.square().sum()])
    totals = _reduce_sums(shard, cut, sums, flat)

    alpha = math.sqrt(group["scale"])
    for w in work:
        r_sq, n_sq, u_sq = totals[w.index].unbind()
        if channel:
            update_norm = torch.sqrt(u_sq)
        else:
            w.factor = torch.sqrt(n_sq) / (torch.sqrt(r_sq) + 1e-8)
            update_norm = w.factor * torch.sqrt(u_sq)
        coef = torch.full((), -_step_size(group, step) * alpha, device=flat.device, dtype=torch.float32)
        if optimizer.norm_growth_limiter:
            if optimizer.scale_front:
                update_norm = update_norm * alpha
            if "limiter_norm" in w.state:
                limiter, w.state["limiter_norm"] = _growth_limiter(update_norm, w.state["limiter_norm"])
                coef = coef / limiter
            else:
                w.state["limiter_norm"] = update_norm.clone()
        w.apply(flat, (w.factor * coef).to(flat.dtype))

    if group["weight_decay"] > 0:
        flat.add_(flat, alpha=-group["lr"] * group["weight_decay"])


class _Weight:
    """A 2-D weight this rank holds part of: its touched rows as an (rows x n) gradient, zeros where
    another rank holds the elements (a view, no copy, when the piece is whole rows)."""

    def __init__(self, index, piece, shape, spans, grad):
        self.index, self.piece, self.shape, self.spans = index, piece, shape, spans
        m, n = shape
        self.wide = m < n  # the projection mixes rows; channels are columns
        self.row_lo, self.row_hi = piece.start // n, (piece.stop - 1) // n
        rows = self.row_hi - self.row_lo + 1
        self.whole_rows = piece.start % n == 0 and piece.stop % n == 0
        g = piece.view(grad)
        if self.whole_rows:
            self.g = g.view(rows, n)
        else:
            buf = torch.zeros(rows * n, dtype=g.dtype, device=g.device)
            buf.narrow(0, piece.start - self.row_lo * n, piece.numel).copy_(g)
            self.g = buf.view(rows, n)

    def owned(self, x: torch.Tensor) -> torch.Tensor:
        """The part of R (or N) this rank counts in tensor-wise sums: each row once overall."""
        n = self.shape[1]
        if self.wide:  # every holder has the full r x n; the holder of element 0 counts it
            return x if self.piece.start == 0 else x[:0]
        first_owned = -(-self.piece.start // n)  # rows whose first element is held here
        return x[first_owned - self.row_lo:]

    def apply(self, flat: torch.Tensor, factor: torch.Tensor) -> None:
        target = self.piece.view(flat)
        if self.whole_rows:
            target.view_as(self.g).addcmul_(self.g, factor)
        else:
            n = self.shape[1]
            update = (self.g * factor).view(-1).narrow(0, self.piece.start - self.row_lo * n, self.piece.numel)
            target.add_(update)


def _shared_rows(shape, spans) -> list[int]:
    """Rows of a tall weight (m >= n) that a cut between ranks splits."""
    n = shape[1]
    return sorted({s.start // n for s in spans[1:] if s.start % n})


def _projection(optimizer, param, shape, rank, seed, flat) -> torch.Tensor:
    """P of the current window, drawn once per refresh (the cache is not state: the seed is)."""
    cached = optimizer._shard_projections.get(param)
    if cached is None or cached[0] != seed:
        cached = (seed, projection(shape, rank, seed, flat.device, flat.dtype))
        optimizer._shard_projections[param] = cached
    return cached[1]


def _reduce_shared_r(shard, cut, weights, rank, flat) -> None:
    """All-reduce the partial R of cut weights: the split rows (tall) or all of R (wide)."""
    if not cut:
        return
    import torch.distributed as dist

    parts = []
    for index, _, shape, spans in cut:
        m, n = shape
        w = weights.get(index)
        r = projection_rank(shape, rank)
        if m < n:
            parts.append(w.r if w is not None else torch.zeros(r, n, dtype=flat.dtype, device=flat.device))
            continue
        rows = _shared_rows(shape, spans)
        block = torch.zeros(len(rows), r, dtype=flat.dtype, device=flat.device)
        if w is not None:
            for k, row in enumerate(rows):
                if w.row_lo <= row <= w.row_hi:
                    block[k] = w.r[row - w.row_lo]
        parts.append(block)
    buffer = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(buffer, group=shard.process_group)
    offset = 0
    for (index, _, shape, spans), part in zip(cut, parts):
        size = part.numel()
        reduced = buffer.narrow(0, offset, size).view_as(part)
        offset += size
        w = weights.get(index)
        if w is None:
            continue
        if shape[0] < shape[1]:
            w.r = reduced.clone()
        else:
            for k, row in enumerate(_shared_rows(shape, spans)):
                if w.row_lo <= row <= w.row_hi:
                    w.r[row - w.row_lo] = reduced[k]


def _reduce_sums(shard, cut, sums, flat) -> dict:
    """Sum the per-weight scalars of cut weights over ranks; weights held whole need no communication."""
    if not cut:
        return sums
    import torch.distributed as dist

    zero = torch.zeros(3, dtype=torch.float32, device=flat.device)
    buffer = torch.stack([sums.get(index, zero).float() for index, *_ in cut])
    dist.all_reduce(buffer, group=shard.process_group)
    out = dict(sums)
    for k, (index, *_) in enumerate(cut):
        if index in sums:
            out[index] = buffer[k]
    return out


def _adamw_pieces(group, per_param, dense, flat, grad, step) -> None:
    """AdamW for pieces of non-2-D tensors that a user put in an APOLLO group (elementwise: no communication)."""
    states, grads, params = [], [], []
    for index, piece in dense:
        s = per_param.setdefault(index, {})
        if "exp_avg" not in s:
            s["exp_avg"] = torch.zeros(piece.numel, dtype=flat.dtype, device=flat.device)
            s["exp_avg_sq"] = torch.zeros_like(s["exp_avg"])
        states.append(s)
        grads.append(piece.view(grad))
        params.append(piece.view(flat))
    m, denom = _adam_moments(group, *_moments(states), grads)
    torch._foreach_addcdiv_(params, m, denom, value=-_step_size(group, step))
