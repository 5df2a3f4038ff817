"""Reversible couplings and their memory-free backward, in plain torch (no Trainer import).

A coupling maps two streams (x1, x2) to

    y1 = lam * x1 + F(x2)
    y2 = beta * x2 + G(y1)

and is inverted exactly (in exact arithmetic) from its outputs:

    x2 = (y2 - G(y1)) / beta
    x1 = (y1 - F(x2)) / lam

A coupling with ``swap`` hands (y2, y1) to the next one (MEFT1/MEFT2 alternate the streams' roles).

``run_couplings`` runs a stack of them. In training, segments of the stack run inside one autograd
Function that keeps only the segment's output: backward rebuilds each coupling's inputs from its
outputs, top to bottom, re-running F and G once with autograd on (and with the RNG state of the forward,
so dropout masks replay), and returns the parameter gradients to autograd as ordinary outputs of
``backward`` (so DDP / ZeRO gradient hooks see them once, like any other gradient).

Rounding: each division by lam or beta multiplies the rounding error of a reconstruction by about
1/lam (1/beta), so it grows like (1/lam)^k over k couplings. Two bounds: the streams can be kept
in a wider dtype than the layers compute in (``stream_dtype``: F and G see their inputs cast to the
model's dtype), and a stack can be cut into segments whose boundaries are stored, so no
reconstruction spans more than one segment.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class ReconstructionDrift(RuntimeError):
    """The reversible backward rebuilt a segment's inputs away from the forward's: its gradients would be noise."""


@dataclass
class ReconstructionCheck:
    """Compares, during the first ``forwards`` training forwards (-1: every one, 0: none), the inputs each segment's
    backward rebuilds with those the forward was given, and stops with ReconstructionDrift past ``tolerance``
    (relative, in the norm): the coupling divides any mismatch by gamma once per layer, so a recompute that differs
    from the forward (another precision, other randomness, a layer that is not a function of its input) turns
    the gradients into noise without a sign. A segment's input is the previous segment's output, which autograd
    keeps anyway; only the first segment's is held for the check, during the checked forwards."""

    forwards: int = 1
    tolerance: float = 1e-3
    worst: float = 0.0  # the largest drift seen (relative)

    def take(self) -> bool:
        """Whether this training forward is checked (counts it)."""
        if self.forwards == 0:
            return False
        self.forwards -= self.forwards > 0
        return True

    def compare(self, rebuilt, given) -> None:
        """``rebuilt`` and ``given``: the stream the segment's first F reads (x2). The other one (x1) only enters
        as lam * x1 and is read by no recompute, so its rebuilt value (the decoders' zero stream gathers the
        rounding of every division above it) does not touch the gradients."""
        if given.device.type == "meta":  # the estimate's dry run: shapes without values
            return
        drift = float((rebuilt.double() - given.double()).norm() / given.double().norm().clamp_min(1e-30))
        self.worst = max(self.worst, drift)
        if drift > self.tolerance:
            raise ReconstructionDrift(
                f"meft: the reversible backward rebuilt a segment's inputs {drift:.1e} away from the forward's "
                f"(relative; tolerance {self.tolerance:g}), so its gradients would be noise. The coupling divides "
                "any difference by gamma per layer: keep the streams in float64 (meft_stream_dtype), use a "
                "power-of-two meft_gamma and shorter segments (meft_segment_layers), and make sure every layer "
                "computes the same function in backward as in forward (no randomness outside torch's RNG, no "
                "state that changes between the two). meft_check_reconstruction 0 turns this check off.")


@dataclass
class MeftSettings:
    """How a converted model runs its stack (decoders and encoders alike)."""

    gamma: float = 0.03125  # the small factor of the coupling (lam and/or beta, by variant)
    reversible_layers: int | None = None  # the bottom k layers; None: all
    segment: int | None = 4  # layers per stored segment; None: one segment
    stream_dtype: torch.dtype | None = torch.float64  # None: the model's dtype
    variant: str = "meft1"  # encoders: meft1 | meft2 | meft3 (decoders: meft1)
    output: str = "chain"  # encoders: the stream carrying the pretrained layers' outputs, or "mean" (paper)
    check: ReconstructionCheck = field(default_factory=ReconstructionCheck)


@dataclass
class Coupling:
    f: Callable[[torch.Tensor], torch.Tensor]
    g: Callable[[torch.Tensor], torch.Tensor]
    lam: float
    beta: float
    params: Sequence[torch.nn.Parameter] = ()  # the trainable parameters F and G use
    reversible: bool = True  # False: plain autograd (activations stored), e.g. the top layers
    swap: bool = False  # output (y2, y1) instead of (y1, y2)

    def forward(self, x1, x2):
        y1 = self.lam * x1 + self.f(x2)
        y2 = self.beta * x2 + self.g(y1)
        return (y2, y1) if self.swap else (y1, y2)

    def inverse(self, y1, y2):
        if self.swap:
            y1, y2 = y2, y1
        x2 = (y2 - self.g(y1)) / self.beta
        x1 = (y1 - self.f(x2)) / self.lam
        return x1, x2


def run_couplings(x1, x2, couplings: Sequence[Coupling], segment: int | None = None,
                  check: ReconstructionCheck | None = None):
    """Run the stack. With autograd on, reversible couplings run in segments of ``segment`` (None: all
    consecutive reversible couplings in one segment) that store only their outputs; ``check`` compares what
    their backward rebuilds with what they were given."""
    if not torch.is_grad_enabled():
        for c in couplings:
            x1, x2 = c.forward(x1, x2)
        return x1, x2
    check = check if check is not None and check.take() else None
    i = 0
    while i < len(couplings):
        if not couplings[i].reversible:
            x1, x2 = couplings[i].forward(x1, x2)
            i += 1
            continue
        j = i
        while j < len(couplings) and couplings[j].reversible and (segment is None or j - i < segment):
            j += 1
        block = list(couplings[i:j])
        params = _unique([p for c in block for p in c.params if p.requires_grad])
        x1, x2 = _ReversibleSegment.apply(x1, x2, block, check, *params)
        i = j
    return x1, x2


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _ReversibleSegment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, couplings, check, *params):
        ctx.couplings = couplings
        ctx.params = params
        ctx.rng = []
        ctx.autocast = _autocast_state(x2.device)
        ctx.check, ctx.given = check, x2 if check is not None else None
        with torch.no_grad():
            for c in couplings:  # c.forward, recording the RNG state before F and before G
                f_state = _rng_state(x2.device)
                x1 = c.lam * x1 + c.f(x2)
                g_state = _rng_state(x2.device)
                x2 = c.beta * x2 + c.g(x1)
                if c.swap:
                    x1, x2 = x2, x1
                ctx.rng.append((f_state, g_state))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        params = ctx.params
        index = {id(p): k for k, p in enumerate(params)}
        grads = [None] * len(params)
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        for c, (f_state, g_state) in zip(reversed(ctx.couplings), reversed(ctx.rng)):
            if c.swap:  # the outputs (and their gradients) arrived as (y2, y1)
                y1, y2, dy1, dy2 = y2, y1, dy2, dy1
            own = [p for p in _unique(c.params) if p.requires_grad]
            with torch.enable_grad(), _autocast(ctx.autocast):
                # y2 = beta*x2 + G(y1): G's gradient flows into y1 and G's parameters
                y1_leaf = y1.detach().requires_grad_(True)
                with _replay_rng(g_state, y1.device):
                    g = c.g(y1_leaf)
                got = torch.autograd.grad(g, [y1_leaf, *own], dy2, allow_unused=True)
                dy1_total = dy1 + _zero_if_none(got[0], y1)
                _accumulate(grads, index, own, got[1:])
                x2 = ((y2 - g.detach()) / c.beta).detach()
                # y1 = lam*x1 + F(x2)
                x2_leaf = x2.requires_grad_(True)
                with _replay_rng(f_state, y1.device):
                    f = c.f(x2_leaf)
                got = torch.autograd.grad(f, [x2_leaf, *own], dy1_total, allow_unused=True)
                _accumulate(grads, index, own, got[1:])
                x1 = ((y1 - f.detach()) / c.lam).detach()
            dy2 = c.beta * dy2 + _zero_if_none(got[0], x2)
            dy1 = c.lam * dy1_total
            y1, y2 = x1, x2.detach()
        if ctx.check is not None:
            ctx.check.compare(y2, ctx.given)
            ctx.given = None
        return (dy1, dy2, None, None, *grads)


def _autocast_state(device) -> list:
    """The autocast settings the forward runs under, per device type (as torch.utils.checkpoint records them).
    Backward runs outside the forward's autocast context (the Trainer calls it after leaving it), so the
    recompute must re-enter them: F and G in another precision rebuild other inputs, and each division by
    gamma multiplies the difference (seen: gradients 200x off under bf16)."""
    if device.type == "meta":  # the estimate's dry run replays autocast itself (no autocast for meta tensors)
        from trainer_plugins.estimate import active_meta_autocast

        meta = active_meta_autocast()
        return [("meta", meta.dtype, meta.device)] if meta is not None else []
    cache = torch.is_autocast_cache_enabled()
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), cache)
            for kind in dict.fromkeys(("cpu", device.type))]


def _autocast(state):
    stack = contextlib.ExitStack()
    for kind, *settings in state:
        if kind == "meta":
            from trainer_plugins.estimate import MetaAutocast

            stack.enter_context(MetaAutocast(*settings))
        else:
            enabled, dtype, cache = settings
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache))
    return stack


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _accumulate(grads, index, params, got):
    for p, g in zip(params, got):
        if g is None:
            continue
        k = index[id(p)]
        grads[k] = g if grads[k] is None else grads[k] + g


def _rng_state(device):
    cpu = torch.get_rng_state()
    accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, accel


class _replay_rng:
    """Run with the RNG state recorded before the coupling's forward, then restore the current one."""

    def __init__(self, state, device):
        self.state, self.device = state, device

    def __enter__(self):
        self.saved = _rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)
        return False
