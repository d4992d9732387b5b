"""Count the accelerator bytes a computation would hold, without an accelerator.

Models are built on PyTorch's ``meta`` device (shapes and dtypes, no data), so a
Stable Diffusion UNet's forward and backward run in about a second on a CPU.
``DeviceBytesCounter`` sees every tensor an operation creates and keeps the sum of
the live (not yet freed) storages and its peak: what a caching allocator would have
to hand out, before its rounding and fragmentation.

Most of that second goes into PyTorch's meta kernels written in Python (norms and their
backward passes, elementwise ops); ``SHAPE_ONLY_KERNELS`` answers the commonest ones from
shapes alone, with outputs of exactly the sizes and dtypes the real meta kernels give, and
their strides (a test compares them; a reviewer's 2,766 random cases differed only in the
strides of size-1 dimensions, which no byte count sees), so the auto-fit's dozens of
estimates take half the time.

Two things the meta device does differently from a GPU are modelled by
``GpuKernelEmulation``:
- attention: on meta/CPU ``scaled_dot_product_attention`` decomposes into its math
  path and materialises the [L, L] attention matrix; a GPU's fused kernels (flash,
  memory-efficient, xformers) never do. It is replaced by a stand-in with the fused
  kernels' footprint: the output and a float32 log-sum-exp saved for backward, and a
  float32 gradient workspace of the query's size during backward.
- autocast: CUDA autocast runs matmuls and convolutions in fp16/bf16 and norms and
  softmax in float32; meta tensors have no autocast, so the casts are made here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from lowvram_ddpo.memory.checkpointing import self_attention_kept


class DeviceBytesCounter(TorchDispatchMode):
    """Live and peak bytes of the non-CPU storages created while the mode is active.

    Storages that existed before (model weights) are not counted: the estimate adds
    them itself, so that it can say where they live in each phase.
    """

    def __init__(self, include_cpu: bool = False) -> None:
        super().__init__()
        self.include_cpu = include_cpu
        """Count CPU tensors too (to check the meta estimate against a real CPU run)."""
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _count(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.device.type == "cpu" and not self.include_cpu:
            return
        storage = tensor.untyped_storage()
        # a view of an input (``weight.t()``, ``x.view(...)``) allocates nothing
        if storage._cdata in inputs or storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = run_op(func, args, kwargs)
        # what an op's schema says of its outputs decides the per-op cost (a fit runs
        # hundreds of thousands of ops): views and in-place ops return inputs' storages
        # (nothing new), other ops only new ones; only the rest ("some": a mix, or a view
        # its schema does not annotate) needs each output looked up among the inputs
        aliasing = _aliasing(func)
        if aliasing == "all":
            return out
        inputs = _storages_of(args, kwargs) if aliasing == "some" else set()
        for tensor in _tensors_in(out):
            self._count(tensor, inputs)
        return out


def run_op(func: Any, args: tuple, kwargs: dict) -> Any:  # noqa: ANN401
    """``func`` on these arguments: its shape-only kernel when it has one for them, else
    PyTorch's own."""
    shape_only = SHAPE_ONLY_KERNELS.get(func)
    out = shape_only(*args, **kwargs) if shape_only is not None else None
    return func(*args, **kwargs) if out is None else out


class ShapeOnlyKernels(TorchDispatchMode):
    """Only the shape-only kernels, under another mode that counts (FLOPs)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return run_op(func, args, kwargs or {})


_ALIASING: dict[Any, str] = {}


UNANNOTATED_VIEWS = {"aten::_unsafe_view", "aten::unsafe_chunk", "aten::unsafe_split"}
"""Ops that return views of an input although their schema does not say so."""


def _aliasing(func: Any) -> str:  # noqa: ANN401
    """Which of ``func``'s outputs may be (views of) its inputs: "all", "none" or "some"
    (then each output's storage is looked up among the inputs')."""
    if func not in _ALIASING:
        schema = getattr(func, "_schema", None)
        if schema is None or schema.name in UNANNOTATED_VIEWS:
            _ALIASING[func] = "some"
        else:
            aliased = [r.alias_info is not None for r in schema.returns]
            _ALIASING[func] = (
                "all" if aliased and all(aliased) else "some" if any(aliased) else "none"
            )
    return _ALIASING[func]


def _tensors_in(out: Any) -> list[torch.Tensor]:  # noqa: ANN401
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list) and all(x is None or isinstance(x, torch.Tensor) for x in out):
        return [x for x in out if x is not None]
    return [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]


def _storages_of(args: tuple, kwargs: dict) -> set[int]:
    return {
        t.untyped_storage()._cdata
        for t in tree_leaves((args, kwargs))
        if isinstance(t, torch.Tensor)
    }


# Shape-only kernels: what an op returns on the meta device, computed from its inputs'
# shapes without PyTorch's Python meta kernels (which check and broadcast in Python, a
# millisecond each). Each answers None for inputs it does not cover (any non-meta tensor,
# mixed dtypes, broadcasting), and the op's own kernel runs instead.
aten = torch.ops.aten


def _all_meta(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.is_meta) for t in tensors)


def _group_norm(x, weight, bias, n, c, hxw, groups, eps):  # noqa: ANN001, ANN202, ARG001
    if not _all_meta(x, weight, bias):
        return None
    stats = x.new_empty((n, groups))  # in the input's dtype, as PyTorch's kernel returns
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _group_norm_backward(grad, x, mean, rstd, weight, n, c, hxw, groups, mask):  # noqa: ANN001, ANN202, ARG001
    if not _all_meta(grad, x, mean, rstd, weight) or grad.stride() != x.stride():
        return None  # PyTorch lays the gradient out like ``grad``: here the same as x
    if any(t is not None and t.dtype != x.dtype for t in (grad, mean, rstd, weight)):
        return None  # PyTorch promotes the outputs
    grad_x = torch.empty_like(x) if mask[0] else None
    grad_weight = x.new_empty((c,)) if mask[1] else None
    grad_bias = x.new_empty((c,)) if mask[2] else None
    return grad_x, grad_weight, grad_bias


_FLOAT32_STATS = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes whose layer-norm statistics PyTorch keeps in float32."""


def _layer_norm(x, shape, weight, bias, eps):  # noqa: ANN001, ANN202, ARG001
    if not _all_meta(x, weight, bias) or x.dtype not in _FLOAT32_STATS:
        return None
    kept = x.dim() - len(shape)
    stats = x.new_empty((*x.shape[:kept], *[1] * len(shape)), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)  # contiguous, as PyTorch's


def _layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, mask):  # noqa: ANN001, ANN202, ARG001
    if not _all_meta(grad, x, mean, rstd, weight, bias) or not grad.is_contiguous():
        return None  # PyTorch lays the gradient out like ``grad``: here contiguous
    if grad.dtype != x.dtype or any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        return None
    grad_x = x.new_empty(x.shape) if mask[0] else None
    grad_weight = x.new_empty(tuple(shape)) if mask[1] and weight is not None else None
    grad_bias = x.new_empty(tuple(shape)) if mask[2] and bias is not None else None
    return grad_x, grad_weight, grad_bias


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of its dimensions is contiguous."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _row_major(t: torch.Tensor) -> bool:
    """Strides falling from the first dimension to the last, none repeated or zero: a
    contiguous tensor or a slice of one (GEGLU's halves), whose elementwise results
    PyTorch makes contiguous."""
    strides = [st for n, st in zip(t.shape, t.stride(), strict=True) if n != 1]
    falling = all(a > b for a, b in zip(strides, strides[1:], strict=False))
    return falling and all(st > 0 for st in strides)


def _same_shape_output(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The output of an elementwise op of same-shape tensors, where its layout is sure:
    one dense layout shared by all (kept), or all row-major (contiguous)."""
    first = tensors[0]
    if _dense(first) and all(t.stride() == first.stride() for t in tensors):
        return torch.empty_like(first)
    if all(_row_major(t) for t in tensors):
        return first.new_empty(first.shape)
    return None


def _elementwise(a, b, *_, **__):  # noqa: ANN001, ANN002, ANN003, ANN202
    """A binary elementwise op of floating tensors of one dtype on the meta device: two of
    one shape (see ``_same_shape_output``), a contiguous one and a tensor that broadcasts
    to it (a bias, a per-channel scale), or one and a Python float."""
    if not (isinstance(a, torch.Tensor) and a.is_meta and a.is_floating_point()):
        return None
    if type(b) is float:
        return _same_shape_output([a])
    if not (isinstance(b, torch.Tensor) and b.is_meta and b.dtype == a.dtype):
        return None
    if b.shape == a.shape:
        return _same_shape_output([a, b])
    broadcasts = b.dim() <= a.dim() and all(
        m in (1, n) for m, n in zip(reversed(b.shape), reversed(a.shape), strict=False)
    )
    if broadcasts and a.is_contiguous():
        return a.new_empty(a.shape)
    return None


def _addmm(bias, m1, m2, *, beta=1, alpha=1):  # noqa: ANN001, ANN202, ARG001
    if not _all_meta(bias, m1, m2) or not (bias.dtype == m1.dtype == m2.dtype):
        return None
    if m1.dim() != 2 or m2.dim() != 2 or bias.dim() > 2:
        return None
    return m1.new_empty((m1.shape[0], m2.shape[1]))


def _like_first(x, *rest, **options):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Unary elementwise ops (and their backward, the gradient first) on the meta device."""
    others = [t for t in (*rest, *options.values()) if isinstance(t, torch.Tensor)]
    tensors = [x, *others]
    if not all(t.is_meta and t.dtype == x.dtype and t.shape == x.shape for t in tensors):
        return None
    return _same_shape_output(tensors)


SHAPE_ONLY_KERNELS: dict[Any, Callable[..., Any]] = {
    aten.native_group_norm.default: _group_norm,
    aten.native_group_norm_backward.default: _group_norm_backward,
    aten.native_layer_norm.default: _layer_norm,
    aten.native_layer_norm_backward.default: _layer_norm_backward,
    aten.add.Tensor: _elementwise,
    aten.sub.Tensor: _elementwise,
    aten.mul.Tensor: _elementwise,
    aten.div.Tensor: _elementwise,
    aten.addmm.default: _addmm,
    aten.gelu.default: _like_first,
    aten.gelu_backward.default: _like_first,
}
"""Ops whose outputs ``DeviceBytesCounter`` makes from shapes on the meta device."""


def _attention_outputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused attention kernel's outputs, shaped but not computed: the output and the
    float32 log-sum-exp its backward reads."""
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


attention_footprint = torch.library.custom_op(
    "lowvram::attention_footprint", _attention_outputs, mutates_args=()
)
"""``_attention_outputs`` as an op of its own, so that selective checkpointing
(``memory.keep_attention``) keeps them on the meta device as it keeps a GPU kernel's."""
attention_footprint.register_fake(_attention_outputs)  # shapes only, whatever the mode


class _FusedAttention(torch.autograd.Function):
    """The memory footprint of a fused attention kernel (values are not computed)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        out, logsumexp = attention_footprint(q, k, v)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: ANN401, ANN205
        q, k, v, _, _ = ctx.saved_tensors
        workspace = q.new_empty(q.shape, dtype=torch.float32)  # flash's fp32 dq accumulator
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del workspace
        return grads


def attention_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """q, k, v of an ``F.scaled_dot_product_attention`` call, given by position or by name
    (FLUX.2's attention passes ``query=``, ``key=``, ``value=``)."""
    names = ("query", "key", "value")
    return (*args[:3], *(kwargs[name] for name in names[len(args[:3]) :]))


def fused_attention(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    """``F.scaled_dot_product_attention``'s memory on the meta device."""
    return _FusedAttention.apply(*attention_inputs(args, kwargs))


# What CUDA autocast runs in the low-precision dtype, and what it runs in float32. The
# half-precision norms (speed/half_norms.py) call torch.group_norm and torch.layer_norm,
# not listed: with autocast off around them on a GPU, they run in the input's dtype.
_LOW_PRECISION = {
    F.linear,
    F.conv1d,
    F.conv2d,
    torch.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    F.scaled_dot_product_attention,
}
_FLOAT32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, F.mse_loss, torch.Tensor.softmax}


_EMULATED_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("autocast", default=None)


def emulated_autocast_dtype() -> torch.dtype | None:
    """The dtype ``GpuKernelEmulation`` stands in CUDA autocast for (None outside it, or
    in full precision): what a module asks on the meta device instead of autocast."""
    return _EMULATED_AUTOCAST.get()


class GpuKernelEmulation(TorchFunctionMode):
    """Fused attention and (optionally) CUDA autocast, for tensors on the meta device.
    ``fused_attention=False`` keeps PyTorch's own attention, whose FLOPs a counter sees."""

    def __init__(self, autocast_dtype: torch.dtype | None, fused_attention: bool = True) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.fused_attention = fused_attention
        self._tokens: list = []

    def __enter__(self) -> GpuKernelEmulation:
        self._tokens.append(_EMULATED_AUTOCAST.set(self.autocast_dtype))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        _EMULATED_AUTOCAST.reset(self._tokens.pop())
        return super().__exit__(*exc)

    def _cast(self, values: Any, dtype: torch.dtype) -> Any:  # noqa: ANN401
        def cast(x: Any) -> Any:  # noqa: ANN401
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                return x.to(dtype)
            return x

        args, kwargs = values
        flat = not any(isinstance(x, tuple | list | dict) for x in (*args, *kwargs.values()))
        if flat:  # the common case (linear, conv, norms), without pytree's cost
            return tuple(cast(x) for x in args), {k: cast(v) for k, v in kwargs.items()}
        return tree_map(cast, values)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.autocast_dtype is not None:
            if func in _LOW_PRECISION:
                args, kwargs = self._cast((args, kwargs), self.autocast_dtype)
            elif func in _FLOAT32:
                args, kwargs = self._cast((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention and self.fused_attention:
            return fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def emulated_checkpoint(
    autocast_dtype: torch.dtype | None, keep_attention: bool = False
) -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for diffusers models that keeps the emulation on
    during the recomputation too (the autograd engine recomputes outside the mode the
    forward ran under); ``keep_attention``: keeping self-attention's outputs, as the
    trainer's ``memory.keep_attention`` does."""
    options = (
        {
            "context_fn": self_attention_kept(
                frozenset({torch.ops.lowvram.attention_footprint.default})
            )
        }
        if keep_attention
        else {}
    )

    def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        def run(*inputs: Any, **inner: Any) -> Any:  # noqa: ANN401
            with GpuKernelEmulation(autocast_dtype):
                return function(*inputs, **inner)

        return torch.utils.checkpoint.checkpoint(
            run, *args, use_reentrant=False, **options, **kwargs
        )

    return checkpoint
