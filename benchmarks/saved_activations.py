"""What one training forward keeps for its backward, eager and compiled, with and without
gradient checkpointing: the activations behind the training phase's peak.

    python benchmarks/saved_activations.py --arch pocket --compile off [--checkpointing]
    python benchmarks/saved_activations.py --arch pocket --compile default --checkpointing

Builds the architecture's UNet with random weights and the trainer's LoRA, in bf16 under
the CPU's autocast (fp16 on a GPU), runs one forward of ``--batch`` latents with
gradients and counts the distinct storages autograd saves for the backward
(``saved_tensors_hooks``), the model's own parameters left out: eager's per-operation
saves, or Inductor's partitioned forward graph with ``--compile``. A compiled training
step whose saves exceed eager's would hold more than the memory estimate says (it counts
eager's). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from lowvram_ddpo.architectures import random_pipeline
from lowvram_ddpo.memory.checkpointing import enable_checkpointing
from lowvram_ddpo.models import make_trainable
from lowvram_ddpo.speed.compile import compile_unet


def saved_bytes(arch: str, mode: str, checkpointing: bool, batch: int, latent: int) -> dict:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.float16 if on_gpu else torch.bfloat16
    torch.manual_seed(0)
    unet = random_pipeline(arch, dtype, str(device)).unet
    make_trainable(unet, 4, 4.0, [])
    if checkpointing:
        enable_checkpointing(unet)
    compile_unet(unet, mode, device)
    unet.train()
    parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    config = unet.config
    x = torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = torch.randn(batch, 8, config.cross_attention_dim, device=device, dtype=dtype)

    def forward_and_backward() -> dict[int, int]:
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        with hooks, torch.autocast(device.type, dtype=dtype):
            out = unet(x, t, encoder_hidden_states=cond).sample
        out.float().square().mean().backward()
        return saved

    forward_and_backward()  # compiles, when compiled
    saved = forward_and_backward()
    return {
        "arch": arch,
        "compile": mode,
        "checkpointing": checkpointing,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype),
        "batch": batch,
        "latent": latent,
        "saved_bytes": sum(saved.values()),
        "saved_storages": len(saved),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="pocket")
    parser.add_argument("--compile", default="off", help="a speed.compile mode")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=8, help="latents per call")
    parser.add_argument("--latent", type=int, default=32, help="latent side, pixels / 8")
    args = parser.parse_args()
    result = saved_bytes(args.arch, args.compile, args.checkpointing, args.batch, args.latent)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
