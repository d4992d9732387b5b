"""Gradient checkpointing of the denoiser, at a coarser grain than diffusers' own.

diffusers checkpoints a UNet's resnets and, inside each attention layer
(``Transformer2DModel``), its transformer blocks, but not the layer's own GroupNorm,
``proj_in`` and ``proj_out`` around them: those keep their inputs for the backward pass,
the GroupNorm's as a float32 copy under autocast. In SD 1.5 at 512 px that is most of
what a checkpointed micro-step holds: at micro-batch 8 (16 latents with guidance) 4.08
GiB of activations at the peak, 2.97 once each attention layer is checkpointed whole
(counted on the meta device, ``lowvram_ddpo.memory.counting``). The price is
recomputing those three small layers: about 2% more operations than diffusers'
checkpointing, which already recomputes the whole forward.

Only layers with a single transformer block are taken whole (SD 1.5, SD 2, LCM
Dreamshaper): recomputing SDXL's ten-block layers whole would hold ten blocks'
activations at once, more than it saves (1.77 against 1.34 GiB, SDXL at 1024 px).
Arithmetic is unchanged: the same operations run, once more in the backward pass.

A UNet's low-resolution blocks hold few activations for their arithmetic (a
convolution's work grows with the square of its channels, its output only with their
number, and the channels grow as the resolution falls), so a run with memory to
spare keeps those levels out of checkpointing first (``memory.uncheckpointed_levels``).
SD 1.5 at 512 px, micro-batch 8 with guidance, estimated on the meta device
(``benchmarks/memory_levers.py``; the recomputation counted by ``speed/flops.py``):
keeping the 8x8 level out (deepest down block, middle, first up block) holds 0.29 GiB
more and recomputes 5% less; with the 16x16 pair 2.78 GiB more, 30% less; with the 32x32
pair too 7.79 GiB more, 58% less.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lowvram_ddpo.errors import UserError

CheckpointFunction = Callable[..., Any]
"""``fn(function, *args, **kwargs)``: runs ``function`` and recomputes it in backward."""


def torch_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
    """PyTorch's non-reentrant checkpoint, as diffusers' default uses it."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _fused_attention_ops() -> frozenset[torch._ops.OpOverload]:
    """The attention kernels ``F.scaled_dot_product_attention`` dispatches to, on a GPU
    and on a CPU, whose outputs (and softmax statistics) their backward reads."""
    aten = torch.ops.aten
    return frozenset(
        {
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
        }
    )


def self_attention_kept(
    extra_ops: frozenset[torch._ops.OpOverload] = frozenset(),
) -> Callable[[], tuple[Any, Any]]:
    """A checkpoint's ``context_fn`` that keeps the outputs of each self-attention kernel
    (query and key of one length) for the backward and recomputes everything else:
    ``memory.keep_attention``. Cross-attention (77 text tokens) costs little to compute
    again. ``extra_ops``: the memory estimate's stand-in for the kernels on the meta
    device.

    Built of module-level functions and op names, and given a ``cache_hash``: AOT
    autograd's compile cache pickles a selective checkpoint's ``context_fn`` into its key
    and wants that hash beside it. Without them it cached no training graph holding the
    checkpoint and each run traced and partitioned it again (the tests' tiny SD 1.5 on the
    CPU: the training call's warm compile 27-36 s against 4 s, and the first warm run
    after a cold one missed the backward's kernels too)."""
    # a sorted tuple, not a set: the key pickles it, and a set of strings pickles in an
    # order that changes from process to process (string hashing is salted)
    kept = tuple(sorted({str(op) for op in _fused_attention_ops() | extra_ops}))
    policy = functools.partial(_keep_self_attention, kept)
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    context_fn.cache_hash = _policy_hash(kept)  # type: ignore[attr-defined]
    return context_fn


def _keep_self_attention(
    kept: tuple[str, ...],
    ctx: Any,  # noqa: ANN401
    op: Any,  # noqa: ANN401
    *args: Any,  # noqa: ANN401
    **kwargs: Any,  # noqa: ANN401
) -> CheckpointPolicy:
    """The policy: save the kernels named in ``kept`` where query and key have one length."""
    if _op_name(op) in kept and args[0].shape[-2] == args[1].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def _op_name(op: Any) -> str:  # noqa: ANN401
    """An op's name ("aten.mm.default"), formatted once per op: eagerly the policy sees
    every op of a checkpointed block, twice."""
    return str(op)


def _policy_hash(kept: tuple[str, ...]) -> str:
    """The policy's bytecode, constants and the names it reads, and the kept ops' names:
    a change to any is a new compile-cache key."""
    code = _keep_self_attention.__code__
    described = [
        code.co_code.hex(),
        repr(code.co_consts),
        repr(code.co_names),
        repr(code.co_varnames),
        *kept,
    ]
    return hashlib.sha256("\n".join(described).encode()).hexdigest()


KEEP_SELF_ATTENTION = self_attention_kept()
"""Built once: torch.compile then reads a constant, instead of tracing the construction."""


def attention_keeping_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
    """``torch_checkpoint`` that keeps self-attention's outputs (``self_attention_kept``)."""
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=KEEP_SELF_ATTENTION, **kwargs
    )


def _drop_in_place_reminder(record: logging.LogRecord) -> bool:
    """torch.compile says once per process, of any checkpoint given a ``context_fn``, that
    its region must hold no in-place op. Ours (diffusers' blocks, peft's LoRA) compiled
    with the attention kept give eager's gradients (``tests/test_keep_attention.py``):
    the line would only puzzle a user."""
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_drop_in_place_reminder)


def checkpoint_function(keep_attention: bool) -> CheckpointFunction:
    """The trainer's checkpoint function for ``memory.keep_attention``."""
    return attention_keeping_checkpoint if keep_attention else torch_checkpoint


def _whole_layers(model: nn.Module) -> list[nn.Module]:
    """Attention layers checkpointed whole: ``Transformer2DModel``s with one block."""
    return [
        m
        for m in model.modules()
        if type(m).__name__ == "Transformer2DModel" and len(m.transformer_blocks) == 1
    ]


def resolution_levels(model: nn.Module) -> list[list[nn.Module]]:
    """A UNet's blocks by resolution, lowest first: the deepest down block, the middle
    block and the up block mirroring the down one, then each down/up pair one resolution
    up. A model without levels (a transformer: SD 3, FLUX.2) has none."""
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    if not down or not up or len(down) != len(up):
        return []
    middle = [model.mid_block] if getattr(model, "mid_block", None) is not None else []
    deepest = len(down) - 1
    return [[down[deepest], *middle, up[0]]] + [
        [down[deepest - k], up[k]] for k in range(1, len(down))
    ]


def most_uncheckpointed_levels(level_count: int) -> int:
    """The most levels a model of ``level_count`` can keep out: one stays checkpointed."""
    return max(level_count - 1, 0)


def check_uncheckpointed_levels(uncheckpointed_levels: int, level_count: int, name: str) -> None:
    """Refuse more levels kept out of checkpointing than a ``name`` model of
    ``level_count`` resolution levels has to give (one line, what to set instead)."""
    if uncheckpointed_levels == 0:
        return
    if level_count == 0:
        raise UserError(
            f"memory.uncheckpointed_levels: a {name} has no resolution levels (a UNet's): "
            "leave it at 0"
        )
    if uncheckpointed_levels > most_uncheckpointed_levels(level_count):
        raise UserError(
            f"memory.uncheckpointed_levels is {uncheckpointed_levels}, but this {name} has "
            f"{level_count} levels: keeping them all is no checkpointing (set "
            "memory.gradient_checkpointing = false), or give at most "
            f"{most_uncheckpointed_levels(level_count)}"
        )


def kept_blocks(model: nn.Module, uncheckpointed_levels: int) -> list[nn.Module]:
    """The blocks of ``model``'s ``uncheckpointed_levels`` lowest-resolution levels, after
    checking that it has more levels than that (at least one must stay checkpointed)."""
    levels = resolution_levels(model)
    check_uncheckpointed_levels(uncheckpointed_levels, len(levels), type(model).__name__)
    return [block for level in levels[:uncheckpointed_levels] for block in level]


def enable_checkpointing(
    model: nn.Module,
    checkpoint: CheckpointFunction = torch_checkpoint,
    uncheckpointed_levels: int = 0,
) -> None:
    """diffusers' gradient checkpointing of ``model`` (a UNet or a transformer), with
    single-block attention layers checkpointed whole instead of their block alone, and the
    ``uncheckpointed_levels`` lowest-resolution levels left out. (diffusers' own
    ``enable_gradient_checkpointing`` called later would checkpoint the blocks again
    inside: right, but recomputed twice.) Called again, it replaces the last setting."""
    kept = kept_blocks(model, uncheckpointed_levels)  # checked before anything changes
    model.enable_gradient_checkpointing(checkpoint)
    kept_modules = {id(m) for block in kept for m in block.modules()}
    for block in kept:  # diffusers' blocks and attention layers each read their own flag
        for module in block.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
    for layer in _whole_layers(model):
        if id(layer) in kept_modules:
            _unwrap(layer)
            continue
        layer.gradient_checkpointing = False  # its block runs inside the layer's checkpoint
        layer.checkpoint_function = checkpoint
        # a method of the layer, not a closure: a deep copy calls the copy's own weights
        layer.forward = types.MethodType(_checkpointed_forward, layer)


def disable_checkpointing(model: nn.Module) -> None:
    """Back to no checkpointing (the estimate tries settings both ways on one model)."""
    model.disable_gradient_checkpointing()
    for layer in _whole_layers(model):
        _unwrap(layer)


def _unwrap(layer: nn.Module) -> None:
    layer.__dict__.pop("forward", None)  # the class's forward again
    layer.__dict__.pop("checkpoint_function", None)


def _checkpointed_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
    # a partial, not ``forward.__get__(layer)``: dynamo in torch 2.11 splits the graph at
    # ``__get__`` (measured on an H100, 2026-11-26), and with CUDA graphs the layers of one
    # shape then share a graph that re-records for each layer's weights, every call
    forward = functools.partial(type(layer).forward, layer)
    if not torch.is_grad_enabled():  # sampling: nothing to recompute
        return forward(*args, **kwargs)
    return layer.checkpoint_function(forward, *args, **kwargs)
