"""Peak memory of a training step, predicted without loading weights: ``trainer-plugins estimate RECIPE``.

The model is built on PyTorch's meta device (shapes and dtypes, no storage) the way training builds it:
the default loader's architecture and dtype, 4-bit layers, then every enabled plugin (``estimate_model``
where a plugin's ``load_model`` reshapes the model, then its usual ``prepare_model``) and its optimizer
(``create_optimizer``, else the Trainer's ``optim``). Two training steps then run on it (forward, backward,
optimizer step, ``zero_grad``) while a dispatch mode adds up the bytes of every tensor the operators create
and subtracts them when they are freed: what the CUDA caching allocator reports as ``memory_allocated``.
So activations, gradients, optimizer state and transients come from the code that trains, not from a
formula per architecture: a plugin that changes what autograd keeps (a side network under no_grad,
reversible layers, checkpointing) is measured as it runs. The peak of the second step is the steady state
that ``torch.cuda.max_memory_allocated`` reports after a few steps.

Where the meta device cannot follow the GPU, the run substitutes what the GPU does:
- attention: the kernel torch's CUDA dispatcher picks for the inputs (``device="cpu"``: the CPU's). A fused
  one (flash / memory-efficient SDPA) keeps q, k, v, the output and a float32 log-sum-exp per query; where
  none applies (float32 inputs with grouped-query heads before torch 2.14: flash needs 16-bit inputs and
  the memory-efficient kernel took no GQA until pytorch#191085) the math kernel keeps the seq x seq scores;
- temporaries a kernel allocates and frees inside itself, which a dispatch mode does not see (it sees the
  operators' outputs): the math kernel's softmax runs as its composite code through the tracker; CUDA's
  softmax backward's ``grad * output`` is added next to its output (``kernel_scratch``);
- bitsandbytes 4-bit linears: packed uint8 weights + quantisation statistics, a dequantised weight alive
  during each matmul (forward, and backward when the input needs a gradient), as bitsandbytes' MatMul4Bit;
- fused optimizers run as their single-tensor form (same state; per-tensor temporaries);
- autocast (``bf16``/``fp16``): the casts torch.autocast makes, replayed on meta (``MetaAutocast``): float32
  inputs of matmuls and attention to 16 bits (the copies autograd saves), 16-bit inputs of losses (and on
  CUDA softmax, norms, reductions) to float32, weight casts cached for the forward.

Not modelled: CUDA context and kernel workspaces (cuBLAS: tens of MiB), allocator fragmentation (the
*reserved* memory above allocated).
DDP adds its reducer's gradient buckets to the single-process run. DeepSpeed ZeRO is simulated for one
rank (``simulate_zero``): gradients handed to the rank's partition as they complete, stage 3's gathers
and releases per module, the partitions and reduce buckets live throughout.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .memory import optimizer_state_bytes, tensor_bytes

GiB = 2**30


# -- the allocator's view -------------------------------------------------------------------------------
class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensors operators create (each storage once, until it is freed) and their peak.

    Storages alive before the tracker starts (the weights) are known but not counted: views of them
    (``weight.t()``) allocate nothing.
    """

    def __init__(self, resident=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()
        self._known: set[int] = {t.untyped_storage()._cdata for t in resident}
        self.outputs = MetaOutputCache()

    def reset_peak(self) -> None:
        self.peak = self.live

    def adopt(self, tensors) -> None:
        """Count the storages of existing ``tensors`` as live (until they are freed): to measure a real run."""
        for t in tensors:
            self._known.discard(t.untyped_storage()._cdata)
            self._track(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # A value read on the host (.item(), a Python `if` on a tensor) has no data on meta: it reads as
            # 1, so code that branches on values (norm limiters, all-ones mask checks) takes one branch.
            return True if args[0].dtype == torch.bool else 1
        scratch = kernel_scratch(func, args, kwargs or {})
        for t in scratch:  # alive next to the outputs, as inside the kernel
            self._track(t.untyped_storage())
        if func in _RUN_AS_COMPOSITE:
            with self:  # the kernel's own operators come through this mode: its temporaries are counted
                out = func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
        else:
            out = self.outputs.call(func, args, kwargs or {})
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        del scratch  # the kernel frees it before it returns
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._counted or key in self._known:
            return
        size = storage.nbytes()
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


class MetaOutputCache:
    """Outputs of meta kernels, rebuilt from a cache: an operator on meta tensors makes new tensors whose shapes,
    strides and dtypes follow from its inputs' and its other arguments, and a model repeats the same operators
    layer after layer (the 70B QLoRAM recipe's simulated steps: ~97k cacheable dispatches, 241 distinct keys).
    torch's Python meta kernels (refs, custom ops' fake kernels) take a hundred microseconds or more; an empty
    tensor of the recorded layout takes a few. Only functional operators (no mutated or aliased arguments, no
    data-dependent or random outputs) on plain meta tensors are cached, and only when the empty tensors rebuilt
    from the record have the kernel's own storage sizes (checked once per key), so the memory the tracker
    counts is the same."""

    _SKIP_TAGS = tuple(getattr(torch.Tag, t) for t in ("dynamic_output_shape", "data_dependent_output",
                                                       "inplace_view", "nondeterministic_seeded")
                       if hasattr(torch.Tag, t))

    def __init__(self):
        self._records: dict = {}
        self._functional: dict = {}
        self.hits = self.misses = 0

    def call(self, func, args, kwargs):
        key = self._key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        record = self._records.get(key)
        if record is not None:
            self.hits += 1
            leaves, spec = record
            return spec.unflatten([torch.empty_strided(leaf[0], leaf[1], dtype=leaf[2], device="meta")
                                   if type(leaf) is tuple else leaf for leaf in leaves])  # tuple: a tensor's layout
        self.misses += 1
        out = func(*args, **kwargs)
        self._records[key] = self._record(out, args, kwargs) or False  # False: not rebuildable, run it each time
        return out

    def _is_functional(self, func) -> bool:
        known = self._functional.get(func)
        if known is None:
            schema = func._schema
            known = self._functional[func] = not (
                schema.is_mutable or any(r.alias_info is not None for r in schema.returns)
                or any(tag in func.tags for tag in self._SKIP_TAGS))
        return known

    def _key(self, func, args, kwargs):
        if not isinstance(func, torch._ops.OpOverload) or not self._is_functional(func):
            return None
        parts = [func, torch.get_default_dtype()]  # a factory's dtype=None means the default dtype
        if not _key_parts(args, parts) or not _key_parts(tuple(sorted(kwargs.items())), parts):
            return None
        key = tuple(parts)
        return None if self._records.get(key, True) is False else key

    @staticmethod
    def _record(out, args, kwargs):
        leaves, spec = tree_flatten(out)
        seen = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        record = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):  # a new storage of its own (not an input's, not another output's)
                if type(leaf) not in _PLAIN_TENSORS or not leaf.is_meta or leaf.untyped_storage()._cdata in seen:
                    return None
                seen.add(leaf.untyped_storage()._cdata)
                layout = (tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype)
                rebuilt = torch.empty_strided(layout[0], layout[1], dtype=layout[2], device="meta")
                if rebuilt.untyped_storage().nbytes() != leaf.untyped_storage().nbytes() or leaf.storage_offset():
                    return None
                record.append(layout)
            elif leaf is None or isinstance(leaf, (bool, int, float)):
                record.append(leaf)
            else:
                return None
        return record, spec


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_KEY_SCALARS = frozenset((type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout,
                          torch.memory_format))


def _key_parts(value, parts: list) -> bool:
    """Append what an operator's output layout can depend on; False for an argument that cannot be keyed."""
    kind = type(value)
    if kind in _PLAIN_TENSORS:
        if not value.is_meta:
            return False
        parts.append((value.shape, value.stride(), value.dtype, value.storage_offset()))
    elif kind in _KEY_SCALARS:
        parts.append((kind, value))  # the type too: 1, 1.0 and True hash alike
    elif kind is tuple or kind is list:
        parts.append(len(value))
        for v in value:
            if not _key_parts(v, parts):
                return False
    else:
        return False
    return True


# -- what the meta device does differently from a GPU ------------------------------------------------------
# Operators whose kernel is torch's composite code on every device (CompositeExplicitAutograd) and allocates
# temporaries a dispatch mode does not see (it sees an operator's outputs): the tracker runs that code itself,
# its operators included (so the installed torch's version of that code is what is counted). _safe_softmax:
# SDPA's math kernel's softmax (attention.cpp): next to the scores, the softmax, a boolean -inf mask of the
# scores' size and the fully-masked rows (before pytorch#139612 also a second scores-sized tensor from where()).
_RUN_AS_COMPOSITE = frozenset(op.default for op in (getattr(torch.ops.aten, "_safe_softmax", None),) if op)  # torch >= 2.5


def kernel_scratch(func, args, kwargs) -> list:
    """Meta tensors for what the CUDA kernel of ``func`` allocates and frees inside itself, alive when its
    outputs are allocated: a dispatch mode sees an operator's outputs only, and the meta kernels allocate no
    temporaries (nothing for real tensors: their kernels allocate for themselves)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_meta or _simulated_device[0] != "cuda":
        return []
    if func is torch.ops.aten._softmax_backward_data.default:
        # CUDA's softmax backward (SoftMax.cu, softmax_backward_cuda_out) computes tmp = grad * output before its
        # reduction kernel: a second gradient-sized tensor next to grad_input (the CPU kernel has none). With
        # SDPA's math kernel that is one more seq x seq scores tensor at its backward.
        grad, output = args[0], args[1]
        return [grad.new_empty(torch.broadcast_shapes(grad.shape, output.shape),
                               dtype=torch.result_type(grad, output))]
    return []


class _FusedAttention(torch.autograd.Function):
    """Memory of a fused attention kernel: keeps q, k, v, the output and the float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_sdpa = torch.nn.functional.scaled_dot_product_attention
_EFFICIENT_ATTENTION_TAKES_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14)


def cuda_attention_is_math(query, key, attn_mask=None) -> bool:
    """Whether torch's CUDA SDPA dispatcher finds no fused kernel for these inputs and runs the math one.
    Flash: fp16/bf16, no mask, head dim <= 256. Memory-efficient: also float32 and masks, but grouped-query
    heads (fewer key heads than query heads) only since pytorch#191085 (July 2026; torch 2.11 falls back,
    2.14's source takes GQA: 2.14 is the version assumed here). transformers passes GQA through
    ``enable_gqa`` when there is no mask, so a float32 GQA model lands on the math kernel before that."""
    flash = query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and query.shape[-1] <= 256
    grouped = key.shape[-3] != query.shape[-3]
    return not (flash or not grouped or _EFFICIENT_ATTENTION_TAKES_GQA)


# -- autocast: the meta device has no autocast dispatch key, so its casts are replayed here ---------------------
_F = torch.nn.functional
# ops torch.autocast runs in the 16-bit dtype (in both CUDA's and the CPU's lists, see torch's "Autocast Op
# Reference"; SDPA: see _meta_sdpa)
_LOWER_PRECISION = frozenset({
    _F.linear, _F.conv1d, _F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
    torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm,
    torch.Tensor.baddbmm, torch.einsum, _F.scaled_dot_product_attention})
# ... and in float32: the losses on both; CUDA's list also has softmax, norms, exp/log/pow and reductions
_FLOAT32_CPU = frozenset({_F.cross_entropy, _F.nll_loss, _F.mse_loss, _F.l1_loss, _F.smooth_l1_loss, _F.kl_div,
                          _F.binary_cross_entropy_with_logits})
_FLOAT32 = {"cpu": _FLOAT32_CPU, "cuda": _FLOAT32_CPU | {
    _F.softmax, _F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
    _F.layer_norm, _F.group_norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow,
    torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.sum, torch.Tensor.sum,
    torch.cumsum, torch.Tensor.cumsum, torch.prod, torch.Tensor.prod}}
_active_autocast: list = [None]


class MetaAutocast(torch.overrides.TorchFunctionMode):
    """``torch.autocast(device, dtype)`` for meta tensors: the same casts (float32 inputs of matmuls and attention
    to ``dtype``, 16-bit inputs of the float32 ops up), so the 16-bit copies that autograd saves are counted.
    Casts of weights (leaves that require grad) are cached until the region ends, as autocast does. Activation
    checkpointing records autocast and recomputes under it in backward; here the checkpointed function is
    wrapped to do the same (torch's own record sees no autocast on the meta device)."""

    def __init__(self, dtype: torch.dtype, device: str = "cuda"):
        super().__init__()
        self.dtype, self.device, self.float32 = dtype, device, _FLOAT32[device]
        self._cached: dict[int, torch.Tensor] = {}
        self._saved_checkpoint = None

    def cast(self, t, dtype: torch.dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        if dtype != torch.float32 and t.is_leaf and t.requires_grad and torch.is_grad_enabled():
            if id(t) not in self._cached:
                self._cached[id(t)] = t.to(dtype)
            return self._cached[id(t)]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _LOWER_PRECISION or func in self.float32) and kwargs.get("dtype") is None:  # dtype=: not eligible
            dtype = self.dtype if func in _LOWER_PRECISION else torch.float32
            args, kwargs = tree_map(lambda t: self.cast(t, dtype), (args, kwargs))
        return func(*args, **kwargs)

    def under_autocast(self, function):
        def run(*args, **kwargs):
            with MetaAutocast(self.dtype, self.device):
                return function(*args, **kwargs)

        return run

    def __enter__(self):
        import torch.utils.checkpoint as checkpoint

        _active_autocast.append(self)
        # checkpoint() looks both paths up in its module when called: wrap the function they will recompute
        self._saved_checkpoint = (checkpoint._checkpoint_without_reentrant_generator, checkpoint.CheckpointFunction)
        generator, reentrant = self._saved_checkpoint
        checkpoint._checkpoint_without_reentrant_generator = \
            lambda fn, *args, **kwargs: generator(self.under_autocast(fn), *args, **kwargs)
        checkpoint.CheckpointFunction = SimpleNamespace(
            apply=lambda fn, *args: reentrant.apply(self.under_autocast(fn), *args))
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.utils.checkpoint as checkpoint

        _active_autocast.pop()
        self._cached.clear()
        checkpoint._checkpoint_without_reentrant_generator, checkpoint.CheckpointFunction = self._saved_checkpoint
        return super().__exit__(*exc)


def active_meta_autocast() -> Optional[MetaAutocast]:
    """The MetaAutocast replaying autocast on the meta device now (None outside one). Code that recomputes in
    backward under the forward's autocast (MEFT's reversible segments, as checkpointing above) records it beside
    the real autocast state and re-enters it: ``MetaAutocast(active.dtype, active.device)``."""
    return _active_autocast[-1]


def meta_autocast(dtype: Optional[torch.dtype], device: str = "cuda"):
    """A ``MetaAutocast`` for 16-bit ``dtype``; nothing for None or float32."""
    return MetaAutocast(dtype, device) if dtype not in (None, torch.float32) else contextlib.nullcontext()


@contextlib.contextmanager
def efficient_attention_takes_gqa(value: bool):
    """Estimate as if CUDA's memory-efficient SDPA kernel did (``True``, torch >= 2.14) or did not take GQA."""
    global _EFFICIENT_ATTENTION_TAKES_GQA
    saved, _EFFICIENT_ATTENTION_TAKES_GQA = _EFFICIENT_ATTENTION_TAKES_GQA, value
    try:
        yield
    finally:
        _EFFICIENT_ATTENTION_TAKES_GQA = saved


def _meta_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
    if query.device.type != "meta":
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa, **kw)
    autocast = _active_autocast[-1]
    if autocast is not None:  # this function stands in for SDPA, which autocast runs in 16 bits
        query, key, value = (autocast.cast(t, autocast.dtype) for t in (query, key, value))
    if _simulated_device[0] == "cuda" and cuda_attention_is_math(query, key, attn_mask):
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]
    return _FusedAttention.apply(query, key, value)


class _Dequantized4bitMatmul(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul (MatMul4Bit), memory-wise: a dequantised weight exists during the forward
    matmul and, when the input needs a gradient, during the backward one; the input is not kept."""

    @staticmethod
    def forward(ctx, x, packed, shape, dtype):
        ctx.shape, ctx.dtype = shape, dtype
        return torch.nn.functional.linear(x.to(dtype), torch.empty(shape, dtype=dtype, device=x.device))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad.matmul(torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)), None, None, None


class Meta4bitLinear(torch.nn.Linear):
    """A bitsandbytes ``Linear4bit`` on the meta device: packed uint8 weight (two values per byte) and its
    quantisation statistics (absmax per 64 values: uint8 with double quantisation, float32 without; float32
    per 256 absmax for the second level)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, double_quant: bool):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        numel = linear.in_features * linear.out_features
        self.weight = torch.nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device="meta"),
                                         requires_grad=False)
        blocks = math.ceil(numel / 64)
        absmax = torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, device="meta")
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("absmax2", torch.empty(math.ceil(blocks / 256) if double_quant else 0, device="meta"),
                             persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x):
        out = _Dequantized4bitMatmul.apply(x, self.weight, (self.out_features, self.in_features), self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)  # as Linear4bit: computed in compute_dtype, returned in the input's dtype


_Generator = torch.Generator


def _generator(device="cpu"):
    return _Generator() if torch.device(device).type == "meta" else _Generator(device)


_simulated_device = ["cuda"]


@contextlib.contextmanager
def meta_execution(device: str = "cuda"):
    """Run a meta-device model as ``device`` ("cuda" or "cpu") would allocate (its attention kernels; generators)."""
    # Code that seeds a generator on the parameters' device (apollo-torch's projections) gets a CPU one:
    # meta tensors draw from it without data.
    patches = [(torch.nn.functional, "scaled_dot_product_attention", _meta_sdpa), (torch, "Generator", _generator)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved_device = _simulated_device[0]
    try:
        _simulated_device[0] = device
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        _simulated_device[0] = saved_device
        for obj, name, value in saved:
            setattr(obj, name, value)


# -- one simulated training run -----------------------------------------------------------------------------
@dataclass
class StepMemory:
    """Bytes for one process, in the steady state (the second step)."""

    weights: int  # parameters and buffers, as stored (4-bit packed)
    trainable: int  # parameters that receive gradients (count)
    parameters: int  # all parameters (count; packed 4-bit weights as their logical size)
    gradients: int  # .grad of the trainable parameters after backward
    optimizer_state: int
    activations: int  # what the forward pass leaves alive for backward (saved tensors, logits, loss)
    peak: int  # weights + the largest live total during the step
    peak_phase: str  # forward, backward or optimizer
    phases: dict = field(default_factory=dict)  # phase -> peak bytes (weights included)

    def components(self) -> dict:
        """Sizes, not shares of the peak: backward frees activations while gradients appear, and transients
        (the float32 logits and their gradient, dequantised weights, optimizer temporaries) come on top."""
        return {"weights": self.weights, "gradients": self.gradients, "optimizer_state": self.optimizer_state,
                "activations": self.activations}


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each tensor once: tied weights are one)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return tensor_bytes(tensors.values())


def logical_numel(p: torch.Tensor) -> int:
    return 2 * p.numel() if p.dtype == torch.uint8 and p.dim() == 2 and p.shape[1] == 1 else p.numel()


def simulate_training(model, optimizer, make_batch: Callable[[], dict], micro_batches: int = 1,
                      steps: int = 2, device: str = "cuda", autocast: Optional[torch.dtype] = None) -> StepMemory:
    """Run ``steps`` optimizer steps on ``model`` (on the meta device, allocating as ``device`` would; forward
    under ``autocast`` to that 16-bit dtype, as the Trainer with bf16/fp16) and return the memory of the last
    step, which accumulates gradients over ``micro_batches`` forward/backward passes. The steps before it only
    bring the optimizer state and the plugins' hooks into being: one pass each (a quarter less dispatch for the
    usual 2 x 2, the same memory in the last step)."""
    resident = list(model.parameters()) + list(model.buffers())
    weights = resident_bytes(model)
    tracker = MemoryTracker(resident)
    phases: dict[str, int] = {}
    gradients = activations = 0
    model.train()
    with meta_execution(device), tracker:
        for step in range(steps):
            last = step == steps - 1
            tracker.reset_peak()
            passes = micro_batches if last else 1
            for micro in range(passes):
                batch = make_batch()
                before = tracker.live
                with meta_autocast(autocast, device):
                    loss = model(**batch).loss
                if last and micro == passes - 1:
                    phases["forward"] = max(phases.get("forward", 0), tracker.peak)
                    activations = tracker.live - before
                    tracker.reset_peak()
                (loss / passes).backward()
                del loss, batch
                if last:
                    phases["backward"] = max(phases.get("backward", 0), tracker.peak)
                    tracker.reset_peak()
            if last:
                gradients = tensor_bytes(p.grad for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if last:
                phases["optimizer"] = tracker.peak
    phases = {k: v + weights for k, v in phases.items()}
    peak_phase = max(phases, key=phases.get)
    params = list(model.parameters())
    return StepMemory(
        weights=weights, trainable=sum(p.numel() for p in params if p.requires_grad),
        parameters=sum(logical_numel(p) for p in params), gradients=gradients,
        optimizer_state=optimizer_state_bytes(optimizer), activations=activations,
        peak=phases[peak_phase], peak_phase=peak_phase, phases=phases,
    )


def language_model_batch(vocab_size: int, batch: int, seq: int, device="meta") -> Callable[[], dict]:
    def make():
        tokens = torch.zeros(batch, seq, dtype=torch.long, device=device)
        return {"input_ids": tokens, "labels": tokens}

    return make


def classification_batch(batch: int, seq: int, device="meta") -> Callable[[], dict]:
    def make():
        return {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device=device),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
                "labels": torch.zeros(batch, dtype=torch.long, device=device)}

    return make


# -- a recipe, as training would build it -------------------------------------------------------------------
def meta_model(model_config, model_args):
    """The model the default loader would build, on the meta device, before any 4-bit quantisation."""
    from .models import model_class, resolve_dtype

    auto, kwargs = model_class(model_args, model_config)
    if str(kwargs.get("attn_implementation", "")).startswith("flash_attention"):
        kwargs["attn_implementation"] = "sdpa"  # the same memory (fused); flash-attn need not be installed here
    with torch.device("meta"):
        return auto.from_config(model_config, dtype=resolve_dtype(model_args.dtype), **kwargs)


class _AcceleratorStandIn:
    """The accelerator of the estimate's Trainer stand-in: every micro-batch ends a step. A class, not a
    SimpleNamespace, so that plugins may hold it weakly as they hold the real Accelerator."""

    sync_gradients = True


def _trainer_stand_in(args):
    """What plugins' create_optimizer reads from the Trainer."""
    from transformers import Trainer

    return SimpleNamespace(args=args, optimizer=None, accelerator=_AcceleratorStandIn(),
                           get_decay_parameter_names=lambda model: Trainer.get_decay_parameter_names(None, model))


def default_optimizer(model, args):
    """The optimizer the Trainer builds from ``args.optim`` (fused kernels as their single-tensor form)."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if kwargs.pop("fused", False):
        kwargs["foreach"] = False
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def estimate_recipe(recipe, world_size: Optional[int] = None, mixed_precision: Optional[str] = None,
                    device: str = "cuda") -> dict:
    """Predicted peak memory per GPU of training ``recipe`` (a ``load_recipe`` result with its model config).
    ``mixed_precision``: "bf16", "fp16" or "no", what the recipe sets (default: read from its arguments); the
    forward runs under that autocast. ``device``: whose kernels to follow ("cpu" to compare with a run here)."""
    import dataclasses

    from .spec import deepspeed_stage

    args, model_args, data_args = recipe.args, recipe.model_args, recipe.data_args
    if mixed_precision is None:
        mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    notes = []
    if model_args.dtype == "auto":  # what "auto" picks on a GPU, also when estimating on a CPU
        model_args = dataclasses.replace(model_args, dtype="bfloat16")
    host = args._host
    from .errors import ConfigError
    from .spec import parallelism_sizes, uses_fsdp

    if recipe.model_config is None:
        raise ConfigError("estimate needs the model's config (load the recipe with load_config=True)")
    sizes = parallelism_sizes(args)
    split = {d: n for d, n in sizes.items() if d != "dp_shard"}
    if split:
        raise ConfigError("estimate models one process, DDP and DeepSpeed ZeRO-1/2/3, not tensor, context or "
                          f"sequence parallelism ({', '.join(f'{d}_size {n}' for d, n in split.items())})")
    if uses_fsdp(args) or sizes:  # dp_shard alone: FSDP2
        raise ConfigError("estimate models one process, DDP and DeepSpeed ZeRO-1/2/3, not FSDP; FSDP's full "
                          "sharding keeps about what ZeRO-3 keeps: estimate with --deepspeed recipes/deepspeed/zero3.json")
    with _no_zero3_init():
        return {**_estimate(recipe, args, model_args, data_args, host, world_size, device, autocast), "notes": notes}


@contextlib.contextmanager
def _no_zero3_init():
    """A ZeRO-3 TrainingArguments makes transformers build models inside deepspeed.zero.Init (partitioned,
    needs a process group); the estimate builds the whole model on meta and partitions by formula."""
    from transformers import modeling_utils

    saved = modeling_utils.is_deepspeed_zero3_enabled
    modeling_utils.is_deepspeed_zero3_enabled = lambda: False
    try:
        yield
    finally:
        modeling_utils.is_deepspeed_zero3_enabled = saved


def _estimate(recipe, args, model_args, data_args, host, world_size, device, autocast) -> dict:
    import copy

    from .models import quantization_config
    from .spec import deepspeed_stage

    model = meta_model(copy.deepcopy(recipe.model_config), model_args)
    shaped = host.call_first("estimate_model", args, model=model, model_args=model_args)
    stage = deepspeed_stage(args)
    if shaped is not None:
        model = shaped
    elif model_args.load_in_4bit:
        from .models import quantize_linears_4bit

        quantize_linears_4bit(model, quantization_config(model_args, zero3=stage == 3), "meta")
    model, optimizer, make_batch = training_setup(recipe, model, "meta")
    memory = simulate_training(model, optimizer, make_batch, micro_batches=min(args.gradient_accumulation_steps, 2),
                               device=device, autocast=autocast)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    zero_run = None
    if stage is not None:
        zero_run = simulate_zero(model, make_batch, memory, stage, world, zero_settings(args, model.config),
                                 micro_batches=min(args.gradient_accumulation_steps, 2), device=device,
                                 autocast=autocast)
    per_rank = distribute(memory, stage, world, zero_run)
    batch, seq = args.per_device_train_batch_size, data_args.max_seq_length
    return {
        "model": type(model).__name__, "dtype": model_args.dtype, "parameters": memory.parameters,
        "autocast": str(autocast).replace("torch.", "") if autocast is not None else None,
        "trainable_parameters": memory.trainable, "tokens_per_step": batch * seq, "micro_batch": [batch, seq],
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_checkpointing": bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)),
        "world_size": world, "zero_stage": stage,
        "single_process": {**memory.components(), "peak": memory.peak, "peak_phase": memory.peak_phase,
                           "phases": memory.phases},
        "per_gpu": per_rank,
    }


def training_setup(recipe, model, device):
    """What the Trainer does to a loaded model before its first step: the plugins' prepare_model, activation
    checkpointing, the optimizer (a plugin's or the Trainer's); and a maker of micro-batches on ``device``."""
    args, host = recipe.args, recipe.args._host
    model = host.pipe("prepare_model", args, "model", model)
    if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
        kwargs = args.gradient_checkpointing_kwargs or getattr(args, "activation_checkpointing_kwargs", None)
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = host.call_first("create_optimizer", args, model=model, trainer=_trainer_stand_in(args)) \
        or default_optimizer(model, args)
    batch, seq = args.per_device_train_batch_size, recipe.data_args.max_seq_length
    if recipe.model_args.task == "sequence-classification":
        return model, optimizer, classification_batch(batch, seq, device)
    return model, optimizer, language_model_batch(model.config.vocab_size, batch, seq, device)


def measure_recipe(recipe, steps: int = 2, autocast: Optional[torch.dtype] = None) -> dict:
    """The real counterpart of ``estimate_recipe`` on this machine, one process: load the weights, prepare as
    the estimate does and measure ``steps`` steps (``measure_training``; forward under ``autocast``)."""
    args = recipe.args
    model = args._host.call_first("load_model", args, model_args=recipe.model_args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not getattr(model, "is_loaded_in_4bit", False):  # 4-bit layers are placed where they were quantised
        model.to(device)
    model, optimizer, make_batch = training_setup(recipe, model, device)
    return measure_training(model, optimizer, make_batch, min(args.gradient_accumulation_steps, 2), steps, autocast)


def measure_training(model, optimizer, make_batch: Callable[[], dict], micro_batches: int = 1,
                     steps: int = 2, autocast: Optional[torch.dtype] = None) -> dict:
    """What ``simulate_training`` predicts, measured: run ``steps`` real steps and return the peak bytes
    allocated during the last one and the weights' bytes. On a GPU: torch.cuda.max_memory_allocated; on a CPU:
    the allocator events the profiler records (so an estimate can be checked without a GPU)."""
    import json
    import tempfile
    import warnings

    cuda = next(model.parameters()).device.type == "cuda"
    model.train()

    device_type = next(model.parameters()).device.type

    def step(passes):
        for _ in range(passes):
            with torch.autocast(device_type, dtype=autocast, enabled=autocast not in (None, torch.float32)):
                loss = model(**make_batch()).loss
            (loss / passes).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps - 1):
        step(1)  # as simulate_training: the warm-up steps take one pass
    weights = resident_bytes(model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(micro_batches)
        torch.cuda.synchronize()
        return {"device": torch.cuda.get_device_name(0), "peak": torch.cuda.max_memory_allocated(), "weights": weights}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(micro_batches)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = f"{tmp}/timeline.raw.json"
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return {"device": "cpu", "peak": max(sum(s) for s in sizes), "weights": weights}


def distribute(memory: StepMemory, stage: Optional[int], world: int, zero_run: Optional[dict] = None) -> dict:
    """Per-rank bytes. DDP: everything of the single-process run, plus DDP's gradient buckets (a second copy of
    the gradients, held by its reducer). ZeRO: ``zero_run`` (``simulate_zero``), whose partitions follow the
    ZeRO paper: optimizer state in float32 and, for 16-bit weights, a float32 master copy, both 1/N per rank."""
    c = memory.components()
    if world <= 1 and stage is None:
        return {**c, "peak": memory.peak, "method": "single process, simulated"}
    if stage is None:
        return dict(c, ddp_buckets=memory.gradients, peak=memory.peak + memory.gradients,
                    method=f"DDP, {world} processes: simulated + gradient buckets")
    return {"weights": zero_run["weights"], "master_weights": zero_run["master_weights"],
            "gradients": zero_run["gradient_partition"], "reduce_buckets": zero_run["reduce_buckets"],
            "optimizer_state": zero_run["optimizer_state"], "activations": c["activations"],
            "peak": zero_run["peak"], "peak_phase": zero_run["peak_phase"],
            "method": f"DeepSpeed ZeRO-{stage}, {world} process{'es' if world > 1 else ''} (--world-size): one rank "
                      "simulated with ZeRO's partitions, reduce hooks" + (" and gathers" if stage == 3 else "")}


def zero_settings(args, model_config) -> dict:
    """The DeepSpeed settings that size buffers, with HF's "auto" values resolved as transformers does."""
    import json

    config = args.deepspeed
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    zero = (config or {}).get("zero_optimization", {})
    hidden = getattr(model_config, "hidden_size", 0) or 0

    def value(key, auto, default):
        v = zero.get(key, default)
        return auto if v == "auto" else float(v)

    return {"reduce_bucket_size": value("reduce_bucket_size", hidden * hidden, 5e8),
            "overlap_comm": bool(zero.get("overlap_comm", False)),
            "param_persistence_threshold": value("stage3_param_persistence_threshold", 10 * hidden, 1e5),
            "max_live_parameters": value("stage3_max_live_parameters", 1e9, 1e9)}


def simulate_zero(model, make_batch, memory: StepMemory, stage: int, world: int, settings: dict,
                  micro_batches: int = 1, steps: int = 2, device: str = "cuda",
                  autocast: Optional[torch.dtype] = None) -> dict:
    """One rank's forward and backward under ZeRO-``stage`` on the meta model, after ``simulate_training``.

    Stage >= 2: each gradient is handed to the rank's partition as soon as it is complete and the full-size
    one is freed (DeepSpeed's reduce hooks), so whole gradients never coexist. Stage 3: the weights are a
    1/N partition; a module's weights are gathered whole before its forward and kept for its backward when
    one will run through it (else released), gathered again before its backward and released after it;
    beyond ``stage3_max_live_parameters`` elements (DeepSpeed's default: 1e9) the least recently gathered are
    released; modules under ``param_persistence_threshold`` elements stay whole.
    The partitions (optimizer state, master weights, gradients, weights) are live throughout; the optimizer
    step adds the float32 gradient partition the step reads."""
    n = max(world, 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype_bytes = trainable[0].element_size() if trainable else 4
    trainable_numel = sum(p.numel() for p in trainable)
    state = int(memory.optimizer_state * 4 / dtype_bytes / n)
    # the float32 copy of the trainable partition the optimizer steps: for 16-bit weights, and always under
    # stage 3 (its flat fp32 partition is separate from the model's ds_tensor partition; measured on CPU)
    master = trainable_numel * 4 // n if dtype_bytes < 4 or stage == 3 else 0
    partition = trainable_numel * dtype_bytes // n if stage >= 2 else 0
    buckets = int(settings["reduce_bucket_size"]) * dtype_bytes * (2 if settings["overlap_comm"] else 1) \
        if stage >= 2 else 0
    # stage 2 over several micro-batches: DeepSpeed also keeps the partition's gradients from the first
    # micro-batch to the boundary (all_grad_tensors, in grad_accum_dtype: the weights' by default), beside the
    # buffer each reduction writes; measured on CPU (2 processes), absent under stage 3
    accumulators = partition if stage == 2 and micro_batches > 1 else 0
    weights = memory.weights if stage < 3 else memory.weights // n
    persistent = 0
    hooks = []
    if stage >= 2:
        hooks += [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trainable]
    gathered: list = []
    if stage == 3:
        live_limit = settings["max_live_parameters"]

        def gather(module, *_):
            whole = getattr(module, "_zero_whole", None)
            if whole and not any(g is module for g, _, _ in gathered):
                gathered.append((module, whole[0], torch.empty(whole[1], dtype=torch.uint8, device="meta")))
                while len(gathered) > 1 and sum(e for _, e, _ in gathered) > live_limit:
                    gathered.pop(0)  # released: the least recently gathered module

        def release(module, *_):
            gathered[:] = [g for g in gathered if g[0] is not module]

        def after_forward(module, inputs, output):
            # kept for backward only if backward will run through it (it needs the weights again)
            if not any(t.requires_grad for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)):
                release(module)

        for module in model.modules():
            direct = tensor_bytes(module.parameters(recurse=False))
            if not direct:
                continue
            if sum(p.numel() for p in module.parameters(recurse=False)) <= settings["param_persistence_threshold"]:
                persistent += direct
                continue
            module._zero_whole = (sum(p.numel() for p in module.parameters(recurse=False)), direct)
            hooks += [module.register_forward_pre_hook(gather), module.register_forward_hook(after_forward),
                      module.register_full_backward_pre_hook(gather), module.register_full_backward_hook(release)]
    resident = list(model.parameters()) + list(model.buffers())
    tracker = MemoryTracker(resident)
    static = state + master + partition + accumulators + buckets + (persistent if stage == 3 else 0)
    import warnings

    try:
        with meta_execution(device), tracker, warnings.catch_warnings():
            # full backward hooks on the first layers (their inputs need no gradient) fire on the outputs' one
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step in range(steps):
                tracker.reset_peak()
                for _ in range(micro_batches):
                    with meta_autocast(autocast, device):
                        loss = model(**make_batch()).loss
                    (loss / micro_batches).backward()
                gathered.clear()
                for p in model.parameters():
                    p.grad = None
    finally:
        for h in hooks:
            h.remove()
        for module in model.modules():
            module.__dict__.pop("_zero_whole", None)
    # the step: a float32 copy of the gradient partition for 16-bit weights, the optimizer's own temporaries
    optimizer_temporaries = max(memory.phases.get("optimizer", 0) - memory.weights - memory.optimizer_state
                                - memory.gradients, 0)
    step_transient = (master if dtype_bytes < 4 else 0) + optimizer_temporaries // n
    peak = weights + static + max(tracker.peak, step_transient)
    return {"peak_phase": "optimizer" if step_transient > tracker.peak else "forward/backward",
            "weights": weights + (persistent if stage == 3 else 0), "master_weights": master,
            "gradient_partition": partition + accumulators, "reduce_buckets": buckets, "optimizer_state": state,
            "peak": peak}


def format_estimate(report: dict) -> str:
    def gib(b):
        return f"{b / GiB:8.3f} GiB"

    rank = report["per_gpu"]
    lines = [f"estimate: {report['model']} in {report['dtype']}"
             + (f" ({report['autocast']} autocast)" if report.get("autocast") else "")
             + f", {report['parameters']:,} parameters, "
             f"{report['trainable_parameters']:,} trainable; micro-batch {report['micro_batch'][0]} x {report['micro_batch'][1]} tokens"
             + (", gradient checkpointing" if report["gradient_checkpointing"] else ""),
             f"  ({rank['method']})"]
    for key in ("weights", "master_weights", "gradients", "ddp_buckets", "reduce_buckets", "optimizer_state",
                "activations"):
        if key in rank:
            lines.append(f"  {key.replace('_', ' '):18s}{gib(rank[key])}")
    phase = rank.get("peak_phase", report["single_process"]["peak_phase"])
    lines.append(f"  {'peak per GPU':18s}{gib(rank['peak'])}   (during {phase}; the "
                 "parts above are sizes: activations are freed as gradients appear, transients come on top)")
    lines.append("  allocated memory (torch.cuda.max_memory_allocated); add the CUDA context (~0.5 GiB) and "
                 "fragmentation for nvidia-smi")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)
