"""lowvram-ddpo: RL fine-tuning of text-to-image diffusion models on one consumer GPU.

Package map (the data flow of one epoch, in order):

- ``config``      presets and their dataclasses: every knob of a run
- ``models``      load a diffusers pipeline (hub id or folder), attach / save LoRA
- ``policy``      one Gaussian policy step per sampler (DDIM today): mean, std, log-prob
- ``rollout``     sample trajectories with log-probs, decode images
- ``rewards``     reward functions behind a registry
- ``algorithms``  advantages (per-prompt statistics) and losses (PPO, SF, RWR, sparse RWR)
- ``trainer``     the epoch loop: sample -> reward -> advantages -> train -> checkpoint
- ``epoch_metrics`` what an epoch reports (loss, KL, clip fraction; "n/a" when undefined)
- ``divergence``  NaN/inf guard: skip non-finite steps, stop a diverged run, save nothing non-finite
- ``preflight``   checks before a run spends time (folder writable, size and words suit the model)
- ``checkpoint``  atomic checkpoints and resume
- ``memory``      estimate (meta device), measure (CUDA), --vram fit, allocator setting, calibration
- ``cli``         the Typer command line
"""

__version__ = "0.1.0"
