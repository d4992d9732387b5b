"""What can be checked of `speed.compile=cudagraphs` without a GPU (docs/benchmarks.md).

    python benchmarks/cudagraphs_cpu_check.py ops       # aten ops per UNet call (LoRA, fp8)
    python benchmarks/cudagraphs_cpu_check.py explain   # graphs and breaks per call kind
    python benchmarks/cudagraphs_cpu_check.py explain --layout sdxl   # SDXL's kind of layout
    python benchmarks/cudagraphs_cpu_check.py trainer pocket-incompressibility train.kl_coef=0.01
    python benchmarks/cudagraphs_cpu_check.py trace     # seconds of the first training calls
    python benchmarks/cudagraphs_cpu_check.py static pocket-rlcm-incompressibility

`ops` and `explain` use a UNet with SD 1.5's block layout at tiny widths (the same module
and op count per call as SD 1.5, small tensors) with peft LoRA on the attention under
bf16 autocast. Each aten op is a kernel launch or a metadata op on a GPU: the host work a
CUDA graph replays in one launch. `trainer` runs two one-batch epochs of a preset with
the UNet compiled by the `cudagraphs` backend (on a CPU it records no graph but runs the
same capture and guards) and prints the rewards, to set beside `--eager`. `trace` times
the first four training calls of that UNet compiled with the `cudagraphs` backend, without
and with gradient checkpointing: the first holds dynamo's trace (what a run's first epoch
pays), the rest show whether anything is traced again. `static` runs `trainer` through
torch's own ``cudagraphs`` backend and prints, for each graph it would record, its inputs,
how many of them that backend treats as static (read in place), how many AOT autograd's
metadata names static (what ``speed/cudagraphs_backend.py`` and Inductor pass), and the
other reasons it would skip the graph (mutated inputs, ops unfit for graphs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowvram_ddpo.memory.checkpointing import enable_checkpointing
from lowvram_ddpo.memory.counting import UNANNOTATED_VIEWS
from lowvram_ddpo.memory.fp8_weights import store_weights_in_fp8


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.computing = 0
        """Ops that compute (views and aliases left out): kernel launches on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        schema = func._schema
        view = any(r.alias_info for r in schema.returns) or schema.name in UNANNOTATED_VIEWS
        if schema.is_mutable or not view:
            self.computing += 1
        return func(*args, **(kwargs or {}))


SDXL_LAYOUT = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)  # fmt: skip
"""SDXL's kind of layout at tiny widths: attention layers of several transformer blocks
(SDXL's have 2 and 10, checkpointed block by block: diffusers' grain), pooled-text and
time-id conditioning."""


def layout_unet(lora: bool, layout: str = "sd15") -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from lowvram_ddpo.speed.lora_casts import skip_lora_input_casts

    torch.manual_seed(0)
    shape = dict(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    unet = UNet2DConditionModel(**(shape | (SDXL_LAYOUT if layout == "sdxl" else {})))
    unet.requires_grad_(False)
    if lora:
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
        skip_lora_input_casts(unet)  # as the trainer does under autocast
    unet.to(torch.bfloat16)  # a half-precision base with an fp32 LoRA, as the trainer's
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


INPUTS = (torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, 32))
"""Latents, timesteps and text embeddings of one call (made outside the op count)."""
SDXL_CONDITIONING = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}


def unet_call(unet: torch.nn.Module, train: bool) -> None:
    x, t, cond = INPUTS
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, encoder_hidden_states=cond).sample
    if train:
        out.float().square().mean().backward()


def count_ops() -> None:
    from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers

    for lora in ("none", "peft", "fused", "peft, fp8 base"):
        unet = layout_unet(lora != "none")
        if lora == "fused":
            fuse_lora_layers(unet)  # speed.fused_lora
        if lora.endswith("fp8 base"):
            layers = store_weights_in_fp8(unet)  # memory.quantize=fp8
            leaves = sum(1 for m in unet.modules() if not any(True for _ in m.children()))
            print(f"fp8 base: {layers} layers converted of {leaves} leaf modules")
        for train in (False, True) if lora != "none" else (False,):
            unet_call(unet, train)  # warm-up
            counter = OpCount()
            with counter:
                unet_call(unet, train)
            what = ("forward + backward" if train else "forward") + f", LoRA: {lora}"
            print(f"{what}: {counter.count} aten ops, {counter.computing} computing")


def explain(layout: str) -> None:
    import torch._dynamo as dynamo

    from lowvram_ddpo.algorithms.steps import base_model

    extra = {"added_cond_kwargs": SDXL_CONDITIONING} if layout == "sdxl" else {}
    print(f"{layout} layout, torch {torch.__version__}")
    for checkpointing in (False, True):
        unet = layout_unet(lora=True, layout=layout)
        if checkpointing:
            enable_checkpointing(unet)
        x, t, cond = INPUTS

        def call(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, unet=unet) -> torch.Tensor:  # noqa: ANN001
            return unet(x, t, encoder_hidden_states=cond, **extra).sample

        with torch.autocast("cpu", dtype=torch.bfloat16):
            unet.eval()
            with torch.no_grad():
                report("sampling (eval, no grad)", dynamo.explain(call)(x, t, cond))
            unet.train()
            report(f"training (checkpointing {checkpointing})", dynamo.explain(call)(x, t, cond))
            with torch.no_grad(), base_model(unet):
                report("base model (adapters off)", dynamo.explain(call)(x, t, cond))


def time_traces() -> None:
    import time

    from torch._dynamo.utils import counters

    from lowvram_ddpo.speed.compile import compile_unet

    for checkpointing in (False, True):
        torch._dynamo.reset()
        counters.clear()
        unet = layout_unet(lora=True)
        if checkpointing:
            enable_checkpointing(unet)
        compile_unet(unet, "default", torch.device("cpu"), backend="cudagraphs")
        unet.train()
        seconds = []
        for _ in range(4):
            started = time.perf_counter()
            unet_call(unet, train=True)
            seconds.append(round(time.perf_counter() - started, 2))
        frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
        print(
            f"training calls, checkpointing {checkpointing}: {seconds} s; "
            f"frames compiled {frames}, graphs {graphs}"
        )


def report(what: str, explained) -> None:  # noqa: ANN001
    print(f"{what}: {explained.graph_count} graph(s), {explained.graph_break_count} break(s)")


def train_through(preset: str, overrides: list[str], eager: bool) -> None:
    import lowvram_ddpo.trainer as trainer
    from lowvram_ddpo.config import apply_overrides, load_preset, set_samples_per_epoch
    from lowvram_ddpo.speed.compile import compile_unet

    if not eager:  # the CLI refuses cudagraphs on a CPU: compile its backend directly
        trainer.compile_unet = lambda unet, mode, device, **kwargs: compile_unet(
            unet, "default", device, backend="cudagraphs", **kwargs
        )
        overrides = [*overrides, "speed.compile=default"]
    else:  # the SD 1.5 presets compile with Inductor: not what --eager compares against
        overrides = [*overrides, "speed.compile=off"]
    config = load_preset(preset)
    apply_overrides(config, [*overrides, "run.epochs=2", "run.progress=false"])
    set_samples_per_epoch(config, config.sample.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        history = trainer.Trainer(config, Path(folder) / "run").fit()
    print("rewards per epoch:", [round(m["reward_mean"], 4) for m in history])


def static_inputs(preset: str, overrides: list[str]) -> None:
    import torch._dynamo.backends.cudagraphs as stock
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    import lowvram_ddpo.speed.compile as compiling

    checks = stock.check_for_skip

    def check_and_say(graph: torch.fx.GraphModule, fixed: int) -> str | None:
        context = torch._guards.TracingContext.try_get()
        meta = context.fw_metadata if context else None
        inputs = sum(1 for node in graph.graph.nodes if node.op == "placeholder")
        print(
            f"graph: {inputs} inputs; static for torch's backend {fixed}, for AOT autograd "
            f"{len(meta.static_input_indices) if meta else '?'}; mutated inputs: "
            f"{stock.check_for_mutation_ignore_cuda_graph_managed_tensor(graph, fixed)}; op "
            f"unfit for graphs: {get_first_incompatible_cudagraph_node(graph)}",
            flush=True,
        )
        return checks(graph, fixed)  # on a CPU: "cpu device", the graph runs as traced

    stock.check_for_skip = check_and_say
    compiling.cudagraphs_compiler = lambda: "cudagraphs"  # torch's own backend
    train_through(preset, overrides, eager=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["ops", "explain", "trainer", "trace", "static"])
    parser.add_argument("preset", nargs="?", default="pocket-incompressibility")
    parser.add_argument("overrides", nargs="*", help="--set style KEY=VALUE (trainer, static)")
    parser.add_argument("--eager", action="store_true", help="trainer: without compile")
    parser.add_argument(
        "--layout", choices=["sd15", "sdxl"], default="sd15", help="explain: the UNet's layout"
    )
    args = parser.parse_args()
    if args.check == "ops":
        count_ops()
    elif args.check == "explain":
        explain(args.layout)
    elif args.check == "trace":
        time_traces()
    elif args.check == "static":
        static_inputs(args.preset, args.overrides)
    else:
        train_through(args.preset, args.overrides, args.eager)


if __name__ == "__main__":
    main()
