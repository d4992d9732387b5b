"""lowvram-ddpo: RL fine-tuning of text-to-image diffusion models on one consumer GPU.

Package map (the data flow of one epoch, in order):

- ``config``      presets and their dataclasses: every knob of a run
- ``models``      load a diffusers pipeline (hub id or folder), attach LoRA
- ``policy``      one Gaussian policy step per sampler (DDIM, LCM): mean, std, log-prob
- ``rollout``     sample trajectories with log-probs, decode images
- ``rewards``     reward functions behind a registry
- ``algorithms``  advantages (per-prompt statistics) and losses (PPO, SF, RWR, sparse RWR)
- ``trainer``     the epoch loop: sample -> reward -> advantages -> train -> checkpoint
- ``epoch_metrics`` what an epoch reports (loss, KL, clip fraction; "n/a" when undefined)
- ``divergence``  NaN/inf guard: skip non-finite steps, stop a diverged run, save nothing non-finite
- ``preflight``   checks before a run spends time (folder writable, size and words suit the model)
- ``checkpoint``  atomic checkpoints, resume and ``export``; ``atomic`` the file writes
- ``lora_export`` LoRA files for diffusers and for the UIs (kohya layout)
- ``reporting``   watching a run: TensorBoard/wandb, metrics.png, the time left
- ``grid``        readable image grids
- ``memory``      estimate (meta device), measure (CUDA), --vram fit, allocator setting, calibration
- ``speed``       torch.compile, the speed benchmark, FLOPs and the time model
- ``cli``         the Typer command line
"""

import logging

__version__ = "0.1.0"


def _drop_torchvision_fallback_notice(record: logging.LogRecord) -> bool:
    """transformers >= 5 says on every import of a diffusers pipeline that, without
    torchvision, CLIP's and SigLIP's image processors fall back to their PIL versions: the
    ones we want (the same preprocessing), so the line is noise on every command."""
    return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_fallback_notice)
