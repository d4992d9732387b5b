"""memory.quantize=fp8: the frozen base stored in 8 bits computes exactly the base with each
weight rounded once, in sampling and training; the estimate, the fit and the time model
count it; a run on it learns."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import build_tiny_pipeline

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.fp8_weights import (
    FP8,
    KEPT_AS_LOADED,
    Fp8Conv2d,
    Fp8Linear,
    dequantise,
    fp8_layers,
    quantise,
    store_weights_in_fp8,
)
from lowvram_ddpo.models import POCKET_DIR, make_trainable


def test_quantise_keeps_each_weight_within_fp8s_rounding_of_its_channel():
    """Channels of very different sizes (1e-4 to 50) each get their own scale: every weight
    comes back within fp8's half-step (1/16 relative) or, below the normal range, within
    its smallest step; zeros and a zero channel stay zero, nothing overflows."""
    torch.manual_seed(0)
    sizes = torch.tensor([1e-4, 1e-2, 1.0, 50.0, 0.0]).view(-1, 1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        weight = (torch.randn(5, 300) * sizes).to(dtype)
        weight[1, 7] = 0.0
        stored, scale = quantise(weight)
        assert stored.dtype == FP8 and scale.dtype == dtype and scale.shape == (5, 1)
        back = dequantise(stored, scale).float()
        assert torch.isfinite(back).all()
        error = (back - weight.float()).abs()
        smallest_step = scale.float() * 2.0**-9  # fp8 e4m3's subnormal step
        assert (error <= weight.float().abs() / 16 + smallest_step + 1e-12).all(), dtype
        assert back[4].eq(0).all() and back[1, 7] == 0
        # a channel's largest maps to fp8's largest value (the range is used), unless its
        # scale would be below the dtype's normal numbers (fp16: the 1e-4 channel)
        assert stored[1:4].float().abs().amax(dim=1).ge(400).all()
        relative = (error[:4].square().mean() / weight[:4].float().square().mean()).sqrt()
        assert relative < 0.05  # ~3.6% rms: 3 significant bits


def _frozen_unet_and_rounded_copy(targets: tuple[str, ...] = ()):
    """A tiny UNet with a LoRA, converted to fp8 as the trainer does it (after the LoRA),
    and a copy with the same LoRA whose plain weights are the rounded ones."""
    unet = build_tiny_pipeline().unet.requires_grad_(False)
    rounded = copy.deepcopy(unet)
    params = []
    for model in (unet, rounded):
        torch.manual_seed(1)
        params.append(make_trainable(model, 4, 4.0, list(targets)))
    with torch.no_grad():  # a LoRA that does something (peft starts lora_B at zero)
        for mine, theirs in zip(*params, strict=True):
            mine.add_(torch.randn_like(mine) * 0.1)
            theirs.copy_(mine)
        for _, layer in fp8_layers(rounded):
            layer.weight.copy_(dequantise(*quantise(layer.weight)))
    converted = store_weights_in_fp8(unet)
    return unet, rounded, params, converted


@pytest.mark.parametrize(
    ("autocast", "targets"),
    [(None, ()), (torch.bfloat16, ()), (None, ("to_q", "conv1"))],
    ids=["fp32", "bf16-autocast", "conv-lora"],
)
def test_an_fp8_unet_computes_exactly_the_unet_with_rounded_weights(autocast, targets):
    """Outputs, the input's gradient and the LoRA's gradients are bitwise those of the
    plain UNet holding the rounded weights, in full precision and under autocast (its
    casts and the backward's dtype reproduced), with a LoRA on convolutions too (peft's
    conv adapters wrap the fp8 layer): sampling and training see one model, so a run's
    replay stays as exact as without fp8."""
    unet, rounded, params, converted = _frozen_unet_and_rounded_copy(targets)
    assert converted > 0
    if targets:  # the resnets' conv1 carry a LoRA, over an fp8 base layer
        lora_conv = unet.down_blocks[0].resnets[0].conv1
        assert isinstance(lora_conv.base_layer, Fp8Conv2d)
        assert lora_conv.lora_A["default"].weight.dtype == torch.float32
    torch.manual_seed(2)
    x = torch.randn(2, unet.config.in_channels, 16, 16)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 8, unet.config.cross_attention_dim)
    results = []
    for model, lora_params in ((unet, params[0]), (rounded, params[1])):
        given = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(given, t, cond).sample
        out.float().square().mean().backward()
        results.append((out.detach(), given.grad, [p.grad for p in lora_params]))
    (out, x_grad, lora), (out_ref, x_grad_ref, lora_ref) = results
    assert torch.equal(out, out_ref)
    assert torch.equal(x_grad, x_grad_ref)
    assert all(torch.equal(a, b) for a, b in zip(lora, lora_ref, strict=True))
    assert all(g.abs().sum() > 0 for g in lora)


def test_fp8_stores_the_body_in_one_byte_a_weight_and_leaves_the_rest():
    """The converted layers hold fp8 weights and a scale per output channel (about half
    the bytes of fp16, a quarter of fp32); the input, output and embedding layers, norms
    and LoRA stay as they were, so diffusers still reads the model's dtype; converting
    again changes nothing."""
    unet = build_tiny_pipeline().unet.requires_grad_(False).half()
    make_trainable(unet, 4, 4.0, [])
    before = sum(t.nbytes for t in (*unet.parameters(), *unet.buffers()))
    layers = [layer for _, layer in fp8_layers(unet)]
    weights = sum(layer.weight.numel() for layer in layers)
    store_weights_in_fp8(unet)
    after = sum(t.nbytes for t in (*unet.parameters(), *unet.buffers()))
    assert before - weights <= after < before - 0.9 * weights  # a byte saved per weight
    assert all(isinstance(layer, Fp8Linear | Fp8Conv2d) for layer in layers)
    assert all(layer.weight.dtype == FP8 for layer in layers)
    assert all(layer.compute_dtype == torch.float16 for layer in layers)
    for name, module in unet.named_children():
        if name in KEPT_AS_LOADED:
            assert all(p.dtype == torch.float16 for p in module.parameters()), name
    assert unet.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    assert store_weights_in_fp8(unet) == 0


def _compiled_graphs(unet: torch.nn.Module, lora: list, partition: str) -> tuple[list, list]:
    """The fp8 UNet's call traced by AOTAutograd with ``partition``'s partitioner (the
    default's, as aot_eager and the cudagraphs backend use; or Inductor's min-cut): its
    forward and backward graphs, and (outputs, LoRA gradients) eager and traced."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(3)
    x = torch.randn(2, unet.config.in_channels, 16, 16)
    t = torch.tensor([10, 500])
    # 2 x 5 tokens: no activation of the graph is shaped like a weight (10 rows)
    cond = torch.randn(2, 5, unet.config.cross_attention_dim)

    def call(latents: torch.Tensor) -> torch.Tensor:
        return unet(latents, t, cond).sample

    graphs = []

    def keep(graph: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    options = (
        {"partition_fn": min_cut_rematerialization_partition} if partition == "min-cut" else {}
    )
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, **options)
    results = []
    for fn in (call, torch.compile(call, backend=backend)):
        for p in lora:
            p.grad = None
        out = fn(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in lora]))
    return graphs, results


def test_an_fp8_unet_traces_whole_and_compiles_to_the_same_numbers(fresh_dynamo):
    """torch.compile (CUDA graphs, Inductor) sees the fp8 layers' forward and backward
    without a graph break, each dequantisation one opaque op (Inductor writes no fp8
    kernel: Triton has none before compute capability 8.9), and the compiled call gives
    the eager numbers (the traced graphs run by eager kernels)."""
    unet, _, params, _ = _frozen_unet_and_rounded_copy()
    assert (
        torch._dynamo.explain(lambda x: unet(x, torch.tensor([1]), torch.randn(1, 8, 32)))(
            torch.randn(1, unet.config.in_channels, 16, 16)
        ).graph_break_count
        == 0
    )
    torch._dynamo.reset()
    graphs, results = _compiled_graphs(unet, params[0], "default")
    ops = (
        torch.ops.lowvram_ddpo.dequantise_fp8.default,
        torch.ops.lowvram_ddpo.dequantise_fp8_again.default,
    )
    layers = sum(isinstance(m, Fp8Linear | Fp8Conv2d) for m in unet.modules())
    assert len(graphs) == 2  # one forward, one backward: no graph break
    counts = []
    for graph, op in zip(graphs, ops, strict=True):
        calls = [node for node in graph.graph.nodes if node.op == "call_function"]
        counts.append(sum(node.target is op for node in calls))
        assert not any(_reads_fp8(node) for node in calls if node.target not in ops)
    # the backward skips the layers no gradient flows through (before the first LoRA)
    forward, backward = counts
    assert forward == layers and 0 < backward < layers
    (out, grads), (out_traced, grads_traced) = results
    assert torch.equal(out, out_traced)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_traced, strict=True))


def test_inductors_partitioner_saves_no_dequantised_weight(fresh_dynamo):
    """Inductor's min-cut partitioner merges identical calls of the forward and backward
    and does not recompute a custom op: with one op for both it saved every layer's
    16-bit weight for the backward. The backward's own op keeps them out: the forward
    hands the backward no tensor shaped like a converted weight in 16 or 32 bits."""
    unet, _, params, _ = _frozen_unet_and_rounded_copy()
    graphs, results = _compiled_graphs(unet, params[0], "min-cut")
    weights = {
        tuple(m.weight.shape) for m in unet.modules() if isinstance(m, Fp8Linear | Fp8Conv2d)
    }
    forward = graphs[0].graph
    (output,) = [node for node in forward.nodes if node.op == "output"]
    saved = [v for v in (a.meta.get("val") for a in output.all_input_nodes) if v is not None]
    kept = [v for v in saved if tuple(v.shape) in weights and v.dtype != FP8]
    assert not kept, [tuple(v.shape) for v in kept]
    assert any(v.dtype == FP8 for v in saved)  # the stored weights are what it keeps
    assert torch.equal(results[0][0], results[1][0])


def _reads_fp8(node: torch.fx.Node) -> bool:
    values = [arg.meta.get("val") for arg in node.all_input_nodes]
    return any(getattr(value, "dtype", None) == FP8 for value in values)


def test_the_estimate_counts_what_the_conversion_saves():
    """The memory estimate's saving is the bytes the real conversion frees on the same
    model, and on SD 1.5 and SDXL fp8 holds about half the fp16 UNet."""
    from lowvram_ddpo.memory.estimate import estimate_memory
    from lowvram_ddpo.memory.quantisation import quantised_savings

    unet = build_tiny_pipeline().unet.requires_grad_(False).half()
    saved, dequantised = quantised_savings(unet, "fp8")
    before = sum(t.nbytes for t in (*unet.parameters(), *unet.buffers()))
    store_weights_in_fp8(unet)
    assert before - sum(t.nbytes for t in (*unet.parameters(), *unet.buffers())) == saved
    assert dequantised > 0
    for preset, arch in (("incompressibility", "sd15"), ("sdxl-aesthetic", "sdxl")):
        config = load_preset(preset)
        held = {}
        for quantize in ("none", "fp8"):
            apply_overrides(config, [f"memory.quantize={quantize}"])
            held[quantize] = estimate_memory(config, arch).phase("training").held["unet"]
        assert 0.45 < held["fp8"] / held["none"] < 0.55, (preset, held)


def test_the_fit_takes_an_fp8_base_before_a_4_bit_one():
    """Where nothing fits at 16 bits, `--vram` takes fp8 (closer to the base than nf4, and
    needs no bitsandbytes); nf4 only where fp8 does not fit either."""
    from lowvram_ddpo.memory.fit import fit_to_vram
    from lowvram_ddpo.memory.units import GB

    config = load_preset("sdxl-aesthetic")
    picks = {gb: fit_to_vram(config, "sdxl", gb * GB).config.memory.quantize for gb in (8, 6, 5)}
    assert picks == {8: "none", 6: "fp8", 5: "nf4"}, picks


def test_the_time_model_charges_fp8s_dequantisation():
    """The same settings on an fp8 base are predicted a little slower (each call casts and
    scales every converted weight), more so on a card whose arithmetic bounds the call."""
    from lowvram_ddpo.speed.flops import epoch_flops
    from lowvram_ddpo.speed.time_model import Gpu, predict_epoch

    config = load_preset("incompressibility")
    apply_overrides(config, ["train.batch_size=8", "train.gradient_accumulation_steps=4"])
    flops = epoch_flops(config, "sd15", count_backward=False)
    assert flops.fp8_layers > 100 and 0.7e9 < flops.fp8_weights < 0.9e9  # SD 1.5's ~0.86 B
    for card in (Gpu.listed("H100", 989.4), Gpu.listed("slow", 40.0)):
        plain = predict_epoch(config, flops, card).total
        apply_overrides(config, ["memory.quantize=fp8"])
        fp8 = predict_epoch(config, flops, card).total
        apply_overrides(config, ["memory.quantize=none"])
        assert plain < fp8 < 1.25 * plain, (card.name, plain, fp8)


def test_fp8_needs_no_bitsandbytes_and_takes_an_lcm_lora():
    """fp8 is plain PyTorch: valid on a CPU; and it converts after loading, so an LCM-LoRA
    can be fused first (bitsandbytes' kinds still refuse one, saying what to use)."""
    from lowvram_ddpo.models import load_pipeline

    config = load_preset("incompressibility")
    apply_overrides(config, ["memory.quantize=fp8"])
    validate(config)
    with pytest.raises(UserError, match="set memory.quantize=fp8 or none instead of nf4"):
        load_pipeline("pocket", quantize="nf4", lcm_lora="some-lcm-lora")


@pytest.mark.skipif(
    not (POCKET_DIR / "pocket-sd" / "model_index.json").is_file(), reason="pocket not built"
)
def test_ddpo_raises_the_reward_on_an_fp8_pocket_model(tmp_path):
    """The pocket DDPO-IS run of test_pocket_training, its base in fp8: the trainer converts
    it, and the reward still rises (fixed seeds)."""
    from lowvram_ddpo.trainer import Trainer

    config = load_preset("pocket-incompressibility")
    apply_overrides(
        config,
        [
            "memory.quantize=fp8",
            "run.epochs=10",
            "train.learning_rate=2e-2",
            "run.grid_every=0",
            "run.progress=false",
            "sample.batches_per_epoch=2",
            "train.gradient_accumulation_steps=2",
        ],
    )
    validate(config)
    trainer = Trainer(config, tmp_path / "run")
    rewards = [m["reward_mean"] for m in trainer.fit()]
    assert any(isinstance(m, Fp8Conv2d) for m in trainer.pipe.unet.modules())
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.03, rewards


def test_the_fit_mentions_an_fp8_base_where_it_would_be_much_faster(monkeypatch):
    """SDXL on an 8 GB card fits at 16 bits with micro-batch 1; the fit keeps that (an fp8
    base changes the base's weights: the user's call) but says what fp8 would give there
    (micro-batch 2, predicted faster by at least FP8_HINT_GAIN). Not said where the user
    set memory.quantize, on a resumed run (whose base never changes under its LoRA), nor
    where fp8 gains little (SD 1.5 on 8 GB)."""
    from lowvram_ddpo.memory.fit import fit_for_run
    from lowvram_ddpo.speed.time_model import H100_DENSE_TFLOPS, Gpu

    # the calibrated card, whatever this machine has
    monkeypatch.setattr(
        "lowvram_ddpo.memory.fit.this_gpu", lambda: Gpu.listed("H100", H100_DENSE_TFLOPS)
    )
    config = load_preset("sdxl-aesthetic")
    config.memory.vram = "8GB"
    fitted, line = fit_for_run(config, "sdxl")
    assert fitted.memory.quantize == "none" and fitted.train.batch_size == 1
    assert "With an fp8 base (--set memory.quantize=fp8" in line
    assert "train.batch_size 1 -> 2" in line.split("With an fp8 base")[1]
    _, held = fit_for_run(config, "sdxl", frozenset({"memory.quantize"}))
    assert "fp8" not in held
    _, resumed = fit_for_run(config, "sdxl", resumed=True)  # its LoRA trained on its base
    assert "fp8" not in resumed
    config.memory.vram = "6GB"  # where a new run gets fp8, a resumed one keeps 16 bits
    assert fit_for_run(config, "sdxl")[0].memory.quantize == "fp8"
    with pytest.raises(UserError, match="keeping memory.quantize as set"):
        fit_for_run(config, "sdxl", resumed=True)
    sd15 = load_preset("incompressibility")
    sd15.memory.vram = "8GB"
    assert "fp8" not in fit_for_run(sd15, "sd15")[1]


def test_data_parallel_leaves_the_fp8_weights_out_of_its_start_up_broadcast(tmp_path):
    """DistributedDataParallel broadcasts every parameter and buffer when it wraps a model,
    which fails on fp8 tensors (gloo: "Invalid scalar type"; NCCL cannot concatenate
    them): the trainer leaves the converted weights and scales out (every process
    converted the same loaded weights alike), and the LoRA still trains through DDP."""
    import torch.distributed as dist

    from lowvram_ddpo.memory.fp8_weights import keep_out_of_ddp_sync

    unet = build_tiny_pipeline().unet.requires_grad_(False)
    lora = make_trainable(unet, 4, 4.0, [])
    converted = store_weights_in_fp8(unet)
    names = keep_out_of_ddp_sync(unet)
    assert len(names) == 2 * converted and all(
        n.endswith(("weight", "weight_scale")) for n in names
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(unet)
        x = torch.randn(2, unet.config.in_channels, 16, 16)
        cond = torch.randn(2, 8, unet.config.cross_attention_dim)
        wrapped(x, torch.tensor([10, 500]), cond).sample.square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for p in lora)


def _sd3_velocity(transformer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(4)
    text, pooled = torch.randn(1, 10, 64), torch.randn(1, 64)
    return transformer(x, text, pooled, torch.tensor([700.0])).sample


def _flux2_velocity(transformer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from lowvram_ddpo import flux2

    torch.manual_seed(4)
    return flux2.velocity(transformer, x, torch.tensor([700.0]), torch.randn(1, 12, 48))


@pytest.mark.parametrize("family", ["sd3", "flux2"])
def test_flow_transformers_on_an_fp8_base_compute_their_rounded_selves(family):
    """SD 3's and FLUX.2's transformers (Linear layers nearly throughout): converted after
    their LoRA, they give bitwise the velocity and gradients of the transformer holding
    the rounded weights; their embeddings and output layers stay as loaded, so diffusers
    still reads their dtype."""
    from tiny import build_tiny_flux2_pipeline, build_tiny_sd3_pipeline

    build, velocity, channels = {
        "sd3": (build_tiny_sd3_pipeline, _sd3_velocity, 4),
        "flux2": (build_tiny_flux2_pipeline, _flux2_velocity, 16),
    }[family]
    transformer = build().transformer.requires_grad_(False)
    rounded = copy.deepcopy(transformer)
    params = []
    for model in (transformer, rounded):
        torch.manual_seed(1)
        params.append(make_trainable(model, 4, 4.0, []))
    with torch.no_grad():
        for mine, theirs in zip(*params, strict=True):
            mine.add_(torch.randn_like(mine) * 0.1)
            theirs.copy_(mine)
        for _, layer in fp8_layers(rounded):
            layer.weight.copy_(dequantise(*quantise(layer.weight)))
    assert store_weights_in_fp8(transformer) > 0
    assert transformer.dtype == torch.float32
    for name, module in transformer.named_children():
        if name in KEPT_AS_LOADED:
            assert all(p.dtype == torch.float32 for p in module.parameters()), name
    x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for model, lora in ((transformer, params[0]), (rounded, params[1])):
        given = x.clone().requires_grad_(True)
        out = velocity(model, given)
        out.square().mean().backward()
        results.append((out.detach(), given.grad, [p.grad for p in lora]))
    (out, x_grad, lora), (out_ref, x_grad_ref, lora_ref) = results
    assert torch.equal(out, out_ref) and torch.equal(x_grad, x_grad_ref)
    assert all(torch.equal(a, b) for a, b in zip(lora, lora_ref, strict=True))


def test_sample_renders_on_an_fp8_base_with_a_lora_on_convolutions(tiny_model_dir, tmp_path):
    """`sample --fp8`: the denoiser converted before it renders; a LoRA loaded over it (on
    attention and on the resnets' convolutions, whose adapters peft builds with the fp8
    layer's class) acts, and the fp8 base's images stay close to the 16-bit base's."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lowvram_ddpo.models import load_pipeline
    from lowvram_ddpo.sampling import BASE_PANEL, SampleRequest, render_comparison

    pipe = load_pipeline(str(tiny_model_dir))
    torch.manual_seed(0)
    targets = ["to_q", "to_v", "conv1"]
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=targets)
    )
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    lora = str(tmp_path / "pytorch_lora_weights.safetensors")
    results = {
        fp8: render_comparison(
            SampleRequest(
                ["a cat"],
                [0],
                lora=lora,
                model=str(tiny_model_dir),
                steps=3,
                progress=False,
                fp8=fp8,
            )
        )
        for fp8 in (False, True)
    }
    rounded = results[True]
    assert rounded.fp8 and "fp8" in rounded.report_lines()[0]
    assert not results[False].fp8 and not results[False].report_lines()
    base, with_lora = (rounded.panels[name] for name in rounded.panels)
    assert (with_lora - base).abs().mean() > 1e-3  # the LoRA acts over the fp8 base
    gap = (base - results[False].panels[BASE_PANEL]).abs().mean()
    assert 0 < gap < 0.05, gap


def test_the_fit_offers_no_bitsandbytes_base_where_it_cannot_load(monkeypatch):
    """On a CUDA machine without bitsandbytes (Windows without its CUDA build, often) the
    fit leaves nf4 out and turns a preset's nf4 into fp8, which loads anywhere; a base the
    user set is kept (its load then says what to install); with bitsandbytes, or on a
    CPU-only machine estimating for a GPU user, every level stays."""
    import lowvram_ddpo.memory.fit as fit

    sd15, klein = (
        load_preset("incompressibility"),
        load_preset("flux2-klein-grpo-incompressibility"),
    )
    assert klein.memory.quantize == "nf4"
    monkeypatch.setattr(fit.torch.cuda, "is_available", lambda: False)
    assert fit.quantisation_levels(sd15) == ["none", "fp8", "nf4"]
    assert fit.quantisation_levels(klein) == ["nf4"]
    monkeypatch.setattr(fit.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fit, "bitsandbytes_usable", lambda: False)
    assert fit.quantisation_levels(sd15) == ["none", "fp8"]
    assert fit.quantisation_levels(klein) == ["fp8"]
    assert fit.quantisation_levels(klein, frozenset({"memory.quantize"})) == ["nf4"]
    monkeypatch.setattr(fit, "bitsandbytes_usable", lambda: True)
    assert fit.quantisation_levels(klein) == ["nf4"]


def test_nothing_fitting_without_bitsandbytes_says_it_would_help(monkeypatch):
    """Where bitsandbytes is missing on a CUDA machine and nothing fits, the one line says
    that installing it may make an nf4 base fit."""
    import lowvram_ddpo.memory.fit as fit
    from lowvram_ddpo.memory.units import GB

    monkeypatch.setattr(fit, "_no_bitsandbytes_here", lambda: True)  # a CUDA machine without
    klein = load_preset("flux2-klein-grpo-incompressibility")
    with pytest.raises(
        UserError, match=r"install bitsandbytes \(pip install 'lowvram-ddpo\[bnb\]'"
    ):
        fit.fit_to_vram(klein, "flux2-klein", 6 * GB)  # fp8 needs 7.04 with the context


def test_an_fp8_base_trains_with_the_other_levers_on(tiny_preset, tmp_path):
    """fp8 beside checkpointing, the half norms and the fused LoRA (each wraps or replaces
    forwards of the same UNet): one epoch trains, the LoRA moves, the layers stay fp8."""
    from lowvram_ddpo.trainer import Trainer

    config = load_preset(str(tiny_preset))
    levers = [
        "memory.quantize=fp8",
        "memory.gradient_checkpointing=true",
        "speed.half_norms=true",
        "speed.fused_lora=true",
    ]
    apply_overrides(config, ["run.epochs=1", "run.progress=false", *levers])
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    ups = [p for n, p in trainer.pipe.unet.named_parameters() if "lora_B" in n]
    assert ups and any(p.abs().sum() > 0 for p in ups)  # peft starts them at zero
    layers = [m for m in trainer.pipe.unet.modules() if isinstance(m, Fp8Linear | Fp8Conv2d)]
    assert layers and all(m.weight.dtype == FP8 for m in layers)


@pytest.mark.skipif(
    not (POCKET_DIR / "pocket-sd" / "model_index.json").is_file(), reason="pocket not built"
)
def test_the_fidelity_benchmark_compares_the_two_bases():
    """benchmarks/fp8_fidelity.py (the fp8 base's images beside the 16-bit base's) on two
    pocket images: the pictures differ a little, the reward is scored on both."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import fp8_fidelity

    prompts = ["a large red circle on a black background", "a small blue square"]
    result = fp8_fidelity.fidelity("pocket", prompts, [0], 3, "jpeg_incompressibility")
    assert result["images"] == 2
    assert 0 < result["mean_abs_pixel_difference"] < 0.1 and result["psnr_db_mean"] > 15
    assert result["reward_mean_fp8"] > 0 and result["reward_mean_16bit"] > 0


def test_the_reward_loads_after_the_denoiser_is_converted(tiny_preset, tmp_path, monkeypatch):
    """The 16-bit denoiser and a reward model never share the host's memory: the reward is
    built once the denoiser is in fp8 (and on the card, where there is one)."""
    import lowvram_ddpo.trainer as trainer_module

    seen = []
    build = trainer_module.build_reward

    def build_and_look(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        unet = trainer.pipe.unet
        seen.append(any(isinstance(m, Fp8Linear | Fp8Conv2d) for m in unet.modules()))
        return build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_reward", build_and_look)
    config = load_preset(str(tiny_preset))
    apply_overrides(config, ["memory.quantize=fp8", "run.progress=false"])
    trainer = trainer_module.Trainer(config, tmp_path / "run")
    trainer.setup()
    assert seen == [True]
