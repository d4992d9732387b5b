"""Count the accelerator bytes a computation would hold, without an accelerator.

Models are built on PyTorch's ``meta`` device (shapes and dtypes, no data), so a
Stable Diffusion UNet's forward and backward run in about a second on a CPU.
``DeviceBytesCounter`` sees every tensor an operation creates and keeps the sum of
the live (not yet freed) storages and its peak: what a caching allocator would have
to hand out, before its rounding and fragmentation.

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
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary


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
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf, inputs)
        return out


class _FusedAttention(torch.autograd.Function):
    """The memory footprint of a fused attention kernel (values are not computed)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: ANN401, ANN205
        q, k, v, _, _ = ctx.saved_tensors
        workspace = q.new_empty(q.shape, dtype=torch.float32)  # flash's fp32 dq accumulator
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del workspace
        return grads


def fused_attention(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
    """``F.scaled_dot_product_attention``'s memory on the meta device; q, k, v given by
    position or by name (FLUX.2's attention passes ``query=``, ``key=``, ``value=``)."""
    names = ("query", "key", "value")
    q, k, v = (*args[:3], *(kwargs[name] for name in names[len(args[:3]) :]))
    return _FusedAttention.apply(q, k, v)


# What CUDA autocast runs in the low-precision dtype, and what it runs in float32.
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


class GpuKernelEmulation(TorchFunctionMode):
    """Fused attention and (optionally) CUDA autocast, for tensors on the meta device.
    ``fused_attention=False`` keeps PyTorch's own attention, whose FLOPs a counter sees."""

    def __init__(self, autocast_dtype: torch.dtype | None, fused_attention: bool = True) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.fused_attention = fused_attention

    def _cast(self, values: Any, dtype: torch.dtype) -> Any:  # noqa: ANN401
        def cast(x: Any) -> Any:  # noqa: ANN401
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                return x.to(dtype)
            return x

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


def emulated_checkpoint(autocast_dtype: torch.dtype | None) -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for diffusers models that keeps the emulation on
    during the recomputation too (the autograd engine recomputes outside the mode the
    forward ran under)."""

    def checkpoint(module: torch.nn.Module, *args: Any) -> Any:  # noqa: ANN401
        def run(*inputs: Any) -> Any:  # noqa: ANN401
            with GpuKernelEmulation(autocast_dtype):
                return module(*inputs)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpoint
