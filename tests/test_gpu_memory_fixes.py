"""Defects the first GPU measurements found, held on the CPU: the nf4 base's fp32
activations, a finished measurement's UNet left on the card, the allocator setting, and
the calibrated card-size figure."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lowvram_ddpo.config import load_preset
from lowvram_ddpo.memory import allocator
from lowvram_ddpo.memory.calibration import CUDA_CONTEXT_BYTES, smallest_card_gb
from lowvram_ddpo.memory.units import GB
from lowvram_ddpo.models import cast_4bit_inputs_like_autocast


class Linear4bit(torch.nn.Linear):
    """Stands in for bitsandbytes' 4-bit Linear, whose dtype handling it copies: compute
    in the compute dtype, return the output in the *input's* dtype."""

    __module__ = "bitsandbytes.nn.modules"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.bfloat16
        out = torch.nn.functional.linear(x.to(compute), self.weight.to(compute))
        return out.to(x.dtype)


def test_4_bit_layers_give_autocast_dtype_activations_like_nn_linear():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), Linear4bit(8, 8), torch.nn.GELU())
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
    assert before.dtype == torch.float32  # the LayerNorm's fp32 passes straight through
    assert cast_4bit_inputs_like_autocast(model) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(x)
    assert after.dtype == torch.bfloat16
    assert model(x).dtype == torch.float32  # outside autocast nothing is cast
    assert torch.allclose(before, after.float(), atol=3e-2)


def test_a_finished_measurement_leaves_no_unet_behind(monkeypatch):
    """With bf16/fp16 accelerate's prepare makes the UNet part of a reference cycle; the
    measured bench must free it before the next row measures (gc disabled here, as a
    collection between rows is not guaranteed)."""
    from lowvram_ddpo.memory import measure

    monkeypatch.setattr("lowvram_ddpo.trainer.resolve_mixed_precision", lambda _, __: "bf16")
    built = []
    original = measure.random_pipeline

    def recording(*args, **kwargs):  # noqa: ANN202
        pipe = original(*args, **kwargs)
        built.append(weakref.ref(pipe.unet))
        return pipe

    monkeypatch.setattr(measure, "random_pipeline", recording)
    config = load_preset("pocket-incompressibility")
    config.sample.batch_size = config.train.batch_size = 4
    gc.disable()
    try:
        measure.measure_run(config, "pocket")
        assert built and built[0]() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("environment", "platform", "expected", "set_by_us"),
    [
        ({}, "linux", "expandable_segments:True", True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "linux", "max_split", False),
        ({"PYTORCH_ALLOC_CONF": "backend:native"}, "linux", "backend:native", False),
        ({}, "win32", "", False),
    ],
)
def test_expandable_segments_unless_the_user_chose(
    monkeypatch, environment, platform, expected, set_by_us
):
    for name in (*allocator.ALLOCATOR_VARIABLES, allocator.OURS):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allocator.sys, "platform", platform)
    line = allocator.configure_allocator()
    assert expected in line if expected else line == ""
    import os

    assert (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True") == set_by_us
    assert allocator.configure_allocator() == line  # asking again says the same


def test_the_card_size_includes_the_cuda_context():
    assert smallest_card_gb(4 * GB - CUDA_CONTEXT_BYTES) == 4
    assert smallest_card_gb(4 * GB - CUDA_CONTEXT_BYTES + 1) == 6
    assert smallest_card_gb(100 * GB) is None
