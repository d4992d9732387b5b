"""``speed.compile_scope = "blocks"``: compile a denoiser's repeated blocks, not the whole.

Compiling a whole SD 1.5 UNet took 262-290 s on an H100 (2026-11-26), once per run and
shape set, before the first epoch: a hobbyist waits minutes at every start, and a short
run never earns them back (``speed/compile_payoff.py``). Most of the UNet is a few kinds
of block repeated at a few widths (16 attention layers of 4 shapes, 22 resnets):
compiled one block at a time, dynamo traces and Inductor lowers each distinct block once
and every other block of that shape reuses its code (parameters are the graph's inputs),
the regional compilation of PyTorch's recipe and diffusers' ``compile_repeated_blocks``.
What it gives up: fusion across a block's edges, and the few layers outside the blocks
(the input and output convolutions, the time embedding, down- and upsamplers, the skip
concatenations) run eagerly. Measured on an H100 (2026-11-27, SD 1.5 fitted to 7 GB,
docs/benchmarks.md): the warm-up epoch 158 s against the whole UNet's 233, each later
epoch 12% slower: for short runs. Inductor's ``default`` mode only: the CUDA-graph modes
replay one graph per UNet call.
"""

from __future__ import annotations

from torch import nn

from lowvram_ddpo.errors import UserError

REPEATED_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "JointTransformerBlock")
"""The repeated blocks compiled whole: a UNet's attention layers with their norm and
projections (what checkpointing takes whole too) and its resnets (diffusers' own list,
``BasicTransformerBlock``, would leave the resnets' norms and convolutions eager); SD 3's
joint blocks (its transformer declares none)."""


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The outermost blocks of ``model`` that ``blocks`` compiles: ``REPEATED_BLOCKS``
    and the model's own ``_repeated_blocks`` (diffusers' list, where it has one)."""
    names = set(REPEATED_BLOCKS) | set(getattr(model, "_repeated_blocks", None) or ())
    regions: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in inside or type(module).__name__ not in names:
            continue
        regions.append(module)
        inside |= {id(m) for m in module.modules()}
    if not regions:
        raise UserError(
            f"speed.compile_scope=blocks: no repeated blocks known in {type(model).__name__}; "
            "use speed.compile_scope=model"
        )
    return regions
