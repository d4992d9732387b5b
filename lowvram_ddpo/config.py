"""Every knob of a run, as dataclasses; presets are TOML files of the same shape.

A preset file has one table per section (``[model]``, ``[sample]``, ...) and may
start with ``extends = "other-preset"`` to change only a few fields of another
preset. Any field can be overridden with a dotted key (``train.learning_rate=1e-4``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lowvram_ddpo.errors import UserError, read_user_text

ALGORITHMS = ("ddpo-is", "ddpo-sf", "grpo", "nft", "rwr", "sparse-rwr")
POLICY_GRADIENT = ("ddpo-is", "ddpo-sf", "grpo")
CLIPPED_RATIO = ("ddpo-is", "grpo")
"""Policy-gradient algorithms whose loss clips an importance ratio (DDPO's clip range)."""
"""The algorithms that train on the sampled steps' log-probs (any policy, KL guard too)."""
FLOW_ALGORITHMS = (*POLICY_GRADIENT, "nft")
"""What trains flow-matching models (RWR's denoising loss is written for DDPM schedules)."""
REWARD_NAMES = (
    "aesthetic",
    "clipscore",
    "hpsv2",
    "imagereward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "mix",
    "pickscore",
    "prompt_alignment",
)
"""The registered rewards (``rewards``; a test keeps the two equal), for help texts that
must not import the reward models."""
OWN_REWARD_HINT = "your own as FILE.py:FUNCTION or module:FUNCTION"


def own_reward_parts(name: str) -> tuple[str, str]:
    """(file or module, name in it) of ``my_reward.py:score``: the last colon splits them,
    as a file may hold one (``C:/r.py:score``)."""
    where, _, attribute = name.rpartition(":")
    return where, attribute


def is_own_reward(name: str) -> bool:
    """A reward of the user's own: ``my_reward.py:score`` or ``package.module:score``."""
    where, attribute = own_reward_parts(name)
    return bool(where) and attribute.isidentifier()


def reward_label(name: str) -> str:
    """A short name for metrics: an own reward's function name, not its whole path."""
    return own_reward_parts(name)[1] if is_own_reward(name) else name


def rewards_in_use(reward: RewardConfig) -> list[str]:
    """The reward's name, or a mix's parts."""
    return list(reward.mix) if reward.name == "mix" else [reward.name]


def with_absolute_reward_files(reward: RewardConfig) -> None:
    """Own rewards' relative file paths made absolute, so that the run's saved config
    still finds them when it is resumed from another folder."""

    def absolute(name: str) -> str:
        where, attribute = own_reward_parts(name)
        if not (is_own_reward(name) and where.endswith(".py")):
            return name
        return f"{Path(where).expanduser().resolve()}:{attribute}"

    reward.name = absolute(reward.name)
    reward.mix = {absolute(name): weight for name, weight in reward.mix.items()}


def own_reward_problem(name: str) -> str | None:
    """What is wrong with an own reward's name that can be told without importing it."""
    where = own_reward_parts(name)[0]
    if where.endswith(".py") and not Path(where).expanduser().is_file():
        return (
            f"reward {name!r}: no file {where} (relative paths start at {Path.cwd()}): "
            "check the path"
        )
    return None


MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
QUANTIZE = ("none", "fp8", "int8", "nf4")
BITSANDBYTES_QUANTIZE = ("int8", "nf4")
"""The kinds bitsandbytes quantises (and places on the GPU) while loading; fp8 is ours."""
ATTENTION = ("sdpa", "xformers")
LOG_WITH = ("auto", "tensorboard", "wandb", "none")
"""Metric trackers (``reporting.trackers``); auto: TensorBoard when installed, else none."""
SAMPLERS = ("auto", "ddim", "lcm", "flow-sde", "flow-cps")
"""``sample.sampler``: each a policy in ``lowvram_ddpo.policy``."""
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "cudagraphs")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune")
"""``speed.compile`` modes that Inductor compiles: its fused kernels (Triton on a GPU);
``cudagraphs`` replays the UNet's own."""
COMPILE_SCOPES = ("model", "blocks")
"""``speed.compile_scope``: the whole denoiser as one graph, or its repeated blocks."""
BLOCK_COMPILE_MODES = ("default",)
"""The ``speed.compile`` modes that compile by blocks: the CUDA-graph ones replay one graph
per UNet call."""


@dataclass
class ModelConfig:
    name: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local diffusers folder (Stable Diffusion 1.x/2.x, SDXL base or an LCM)."""
    revision: str = ""
    """Hub revision; empty for the default branch."""
    lcm_lora: str = ""
    """An LCM-LoRA fused into the base before training (hub id, folder or .safetensors;
    e.g. latent-consistency/lcm-lora-sdv1-5): SD 1.5 then samples in 2-8 LCM steps."""
    mixed_precision: str = "fp16"
    """Frozen base weights and autocast dtype: no (fp32), fp16 or bf16. LoRA stays fp32."""
    lora_rank: int = 4
    """LoRA rank; 0 fine-tunes the whole UNet (fp32 weights: needs a large card)."""
    lora_alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=list)
    """Module names the LoRA goes on; empty: the model's own (a UNet's attention
    projections; SD 3.x's joint attention, its text projections included)."""
    allow_tf32: bool = True
    use_t5: bool = True
    """SD 3.x: load its T5-XXL text encoder (4.8 B parameters). false: without it (its
    tokens are zeros, as diffusers runs SD 3 without T5): far less memory, prompts
    followed less closely (long ones most)."""


@dataclass
class MemoryConfig:
    """Levers that trade speed for accelerator memory (``lowvram-ddpo bench memory``)."""

    vram: str = ""
    """Fit the run to a card of this size ("8GB"), or "auto" (what this machine's CUDA card
    has free; the GPU presets' setting): picks the batch sizes, checkpointing, offloading
    and quantisation below, the fastest that fit, keeping any of them set on the command
    line, and reports the predicted peak and epoch time. Empty or "off": use them as set.
    A preset's "auto" without a CUDA card, or in a multi-GPU run, uses them as set."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass (less memory, ~30% slower)."""
    uncheckpointed_levels: int = 0
    """With gradient_checkpointing, a UNet's N lowest-resolution levels keep their
    activations for the backward instead of recomputing them (level 1: the middle block
    with the deepest down block and the up block mirroring it; each next level the pair
    one resolution up). Those blocks hold the fewest activations per operation, so each
    level saves more recomputation per byte than the next (SD 1.5 at 512 px, micro-batch
    8, estimated: 1 level +0.29 GiB for 5% less recomputation, 2 levels +2.78 GiB for
    30% less, 3 +7.79 GiB for 58% less). 0: every level recomputed. A fit (memory.vram)
    chooses it."""
    keep_attention: bool = False
    """With gradient_checkpointing, keep each checkpointed self-attention's output (and its
    softmax statistics) for the backward instead of computing the attention again: the
    rest of the layer is still recomputed (PyTorch's selective checkpointing,
    ``memory/checkpointing.py``). Self-attention is the costliest arithmetic per byte it
    outputs (SD 1.5 at 512 px: 15% of a forward's FLOPs, 24 MB per latent kept). Same
    numbers, bitwise. Needs gradient_checkpointing and memory.attention=sdpa. A fit
    (memory.vram) chooses it under Inductor (speed.compile), where it fits and pays."""
    offload: bool = True
    """Keep the text encoder and VAE on the CPU, on the GPU only for their phase."""
    optimizer: str = "adamw8bit"
    """adamw8bit (bitsandbytes; falls back to adamw where it or CUDA is missing) or adamw."""
    quantize: str = "none"
    """The frozen UNet's weights stored in fewer bits, LoRA on top: fp8 (ours, plain
    PyTorch: any CUDA card or a CPU, CUDA graphs and compile; half the base, ~3.6% rms error per
    weight, ``memory/fp8_weights.py``), or int8 / nf4 (bitsandbytes, CUDA, Linear layers
    only: QLoRA)."""
    attention: str = "sdpa"
    """sdpa (PyTorch's fused kernels) or xformers (when installed)."""
    text_encoders_on_cpu: bool = False
    """Run the text encoder(s) on the CPU in fp32, never on the card. Each prompt is
    encoded once (then cached), so it costs time only while new prompts arrive; it takes
    SDXL's 1.5 GB encode phase off the GPU."""
    vae_tiling: bool = False
    """Decode images larger than 512 px in overlapping 512 px tiles (diffusers' VAE
    tiling): SDXL's 1024 px decode needs ~4x less memory; seams are blended."""
    decode_batch: int = 1
    """Images the VAE decodes at once (SD 1.5 at 512 px: ~0.9 GiB of working memory each,
    inferred from an H100 row): fewer, larger decode calls. A fit (memory.vram) raises it, up to the
    sampling batch, as far as the run's peak stays where the other phases put it. A
    decode that runs out of GPU memory goes on with half as many (down to one, then in
    overlapping tiles), logged and kept for a resumed run (the width, and 512 px tiles)."""


@dataclass
class SpeedConfig:
    """Levers that make a run faster (``lowvram-ddpo bench speed`` measures them; the
    memory estimate counts what they hold). The CUDA-graph mode keeps the arithmetic;
    Inductor's modes fuse kernels but round half-precision results where eager does (else
    sampling and training would round apart); ``fused_lora`` and ``half_norms`` change
    some roundings, the same in sampling and training."""

    compile: str = "off"
    """torch.compile the UNet: off, default (fused kernels), reduce-overhead (+ CUDA
    graphs) or max-autotune: compiling each shape takes minutes on a GPU (cached on disk
    for the next run), so they pay on long runs; they need Triton on a GPU; they round
    half-precision results where eager does (the replay: exact in ten seeded bf16 runs on
    the CPU; 7.0e-6 rms, 0.07 of the clip range, on an H100 in fp16; max-autotune may pick
    kernels per graph). default measured on an H100 (SD 1.5, micro-batch 8 with
    checkpointing): the epoch 1.84x eager's, 290 s of compiling. cudagraphs:
    the UNet's own kernels replayed as CUDA graphs, no Triton and no kernel generation
    (a trace of seconds to a minute per shape), CUDA only; measured on an H200 with SD
    1.5: bit-exact fp16 replay, training 1.88x faster at micro-batch 4, +2.3 GiB for the
    graphs' memory pool (counted by the estimate); on an H100, the RLCM preset's epoch
    2.0x faster. default is on in the SD 1.5 DDPO/RWR presets (off where this machine
    cannot run it: ``memory.fit.compile_where_it_runs``), cudagraphs in the SD 1.5-shaped
    RLCM presets (the fit drops it where its pool does not fit), off elsewhere."""
    compile_scope: str = "model"
    """What speed.compile=default compiles: the whole UNet as one graph ("model"), or each
    attention layer and resnet apart ("blocks": each distinct block compiles once and the
    blocks of its shape reuse it; less fusion, the layers between blocks eager;
    ``speed/compile_regions.py``). It cuts the minutes of compiling at a run's start, and
    costs every epoch after: on an H100 (2026-11-27, SD 1.5 fitted to 7 GB) the warm-up
    epoch took 158 s instead of 233, each later one 12% longer; for quick tries."""
    compile_decoder: bool = False
    """Compile the VAE's decoder with Inductor (``speed/compile_decoder.py``) for the run's
    decode (memory.decode_batch images at the run's resolution; other shapes, such as a
    narrower decode after running out of memory or tiles, decode eagerly): its float32
    norms and casts fused, where eager runs them as separate memory-bound kernels. It
    compiles at the first decode (SD 1.5's VAE at 512 px: 18 s on an H200; cached for the
    next run); needs Triton on a GPU; a run that decodes in tiles (memory.vae_tiling)
    compiles nothing. The replay is untouched (the decode is no log-probability); images
    may differ by a rounding (at most 0.0054 on the H200). Measured on an H200
    (2026-11-27): decodes 2.4-2.7x faster in 0.36 of eager's working memory. On in the
    RLCM presets (``memory.fit`` drops a preset's where it cannot run or does not pay),
    off elsewhere: ~1% of a 50-step epoch."""
    half_decode: bool = False
    """Decode in the VAE's own half precision outside autocast, as diffusers' SD 1.5
    pipelines do (GroupNorm, SiLU and the mid-block attention in fp16, accumulating in
    float32 inside their kernels), instead of under autocast, which runs every GroupNorm
    in float32 with a cast up and down around it, at up to 512x512 pixels by 128
    channels: half the bytes through those layers, a smaller working memory (the memory
    estimate counts it). SDXL's VAE, which overflows in fp16, still decodes in float32;
    another VAE whose fp16 decode overflows (NaN pixels) has those images decoded again
    under autocast, with a warning. The replay is untouched (the decode is no
    log-probability); images differ by a rounding. Measured on an H200 (2026-11-27):
    decodes 15-18% faster in 0.57-0.69 of autocast's working memory, ~1% of a 50-step
    epoch's time: off."""
    graph_sampling: bool = False
    """With speed.compile=cudagraphs, replay the sampling call as graphs too. It pays only
    where the host's launches bound that call: few latents per call on a fast card (the
    RLCM presets turn it on). With 8 guided SD 1.5 images per step it gained nothing on an
    H200 (0.469 s per image eager, 0.474 with graphs) and cost a pool of its own; off, the
    sampling call runs eagerly (no trace, no pool). Inductor's graph modes
    (reduce-overhead, max-autotune) always compile it, for their fused kernels."""
    fused_lora: bool = False
    """Compute each LoRA linear layer's up-projection, scaling and sum with the frozen
    layer's output in one matmul (``speed/lora_fusion.py``): per layer two kernels and
    three passes over its output fewer, one rounding instead of three. Measured on an H100
    (2026-11-26): exact replay, but no faster (69.5 against 70.6 ms of kernels per
    sampling call); off."""
    cudnn_benchmark: bool = False
    """Let cuDNN time its convolution algorithms for each of the run's shapes once and keep
    the fastest (``torch.backends.cudnn.benchmark``), instead of its heuristic's pick: a
    UNet's shapes are fixed for the run, and convolutions (cuDNN's, under Inductor too) are
    a large part of its kernels. The sampling and training calls of one shape share the
    chosen algorithm (the replay keeps its exactness); another run may choose others.
    A faster algorithm may want a larger workspace, which the memory estimate does not
    count. Off until a GPU row measures its speed and peak."""
    channels_last: bool = False
    """Store the UNet's convolution weights in channels-last (NHWC) layout, the one a GPU's
    tensor-core convolutions take (``speed/channels_last.py``): cuDNN then stops turning
    each convolution's input and output between layouts (6.3% of an SD 1.5 epoch's kernel
    time under Inductor on an H100, 2026-11-27). Under Inductor every compiled graph is
    then laid out channels-last too (its heuristic alone keeps SD's training graph NCHW).
    Eager on an H100 the training call was 8% faster and sampling 10% slower; its speed
    under Inductor and its replay are not measured yet: off."""
    half_norms: bool = False
    """Under mixed precision, run GroupNorm and LayerNorm in half precision, as diffusers'
    fp16 inference does (``speed/half_norms.py``), instead of autocast's float32 with a cast
    up and down around each: on an H100 copying and casting took a third of an SD 1.5
    sampling call's kernel time. One rounding differs from autocast's, in sampling and
    training alike (replay unchanged). Off until its GPU speed and replay are measured."""


@dataclass
class SampleConfig:
    sampler: str = "auto"
    """ddim (DDPO), lcm (RLCM: latent consistency models), flow-sde (Flow-GRPO's SDE for
    flow-matching models: SD 3.x, FLUX.2), flow-cps (coefficients-preserving sampling,
    Flow-GRPO's recommendation since 2025-10, noise level 0.8) or auto (chosen from the
    model's scheduler: flow-sde for flow models)."""
    resolution: int = 512
    num_steps: int = 50
    eta: float = 1.0
    """DDIM's noise (1: DDPM's variance); ddim only."""
    noise_level: float = 0.7
    """The flow samplers' noise level a: flow-sde's std is a sqrt(sigma / (1 - sigma)) per
    unit time (Flow-GRPO: 0.7); flow-cps's sigma_next sin(a pi / 2), a <= 1 (Flow-GRPO
    uses 0.8 with CPS: set it, the default stays 0.7)."""
    sde_window: int = 0
    """Flow-GRPO-Fast (flow samplers only): only this many consecutive steps, starting at a
    random step in the first half, are stochastic and trained; the others follow the ODE.
    0: every step is stochastic (train.timestep_fraction picks the trained ones)."""
    guidance_scale: float = 5.0
    batch_size: int = 8
    """Images denoised together, per process."""
    batches_per_epoch: int = 32
    """Sampling batches per epoch, per process."""
    negative_prompt: str = ""
    group_size: int = 1
    """Images per prompt in an epoch (GRPO's group): the epoch's prompts are drawn once
    per group of this many images. 1: each image draws its own prompt (DDPO)."""


@dataclass
class TrainConfig:
    algorithm: str = "ddpo-is"
    """ddpo-is (PPO clip), ddpo-sf (REINFORCE), grpo (PPO clip on advantages normalised
    within groups of sample.group_size images of one prompt: Flow-GRPO), nft (DiffusionNFT,
    flow models: trains on the final images only), rwr, sparse-rwr."""
    learning_rate: float = 3e-4
    batch_size: int = 4
    """Training micro-batch (samples per forward/backward), per process."""
    gradient_accumulation_steps: int = 16
    """Micro-batches per optimiser step (each micro-batch covers all its trained timesteps)."""
    inner_epochs: int = 1
    clip_range: float = 1e-4
    kl_coef: float = 0.0
    """A guard against reward hacking (DDPO-IS/SF, GRPO, NFT; with LoRA): add kl_coef x
    the KL of each trained denoising step to the base model's (the UNet with its adapters
    off), averaged over latent dims as the log-prob is; for NFT the squared velocity gap
    to the base (its train.beta, 1e-4). 0: off."""
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    max_skipped_steps: int = 5
    """Optimiser steps with NaN/inf gradients are skipped; this many in a row stop the run
    (with an fp16 gradient scaler, 16 more: it skips steps while it lowers its scale)."""
    timestep_fraction: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    nft_beta: float = 1.0
    """DiffusionNFT's beta: how far the implicit positive/negative policies step from the
    sampling policy (1: its default; 0.1 for its OCR and multi-reward runs)."""
    rwr_beta: float = 1.0
    """RWR inverse temperature, applied to the normalised advantages."""
    sparse_rwr_percentile: float = 90.0
    """Sparse RWR keeps samples whose advantage is at or above this batch percentile."""


@dataclass
class RewardConfig:
    name: str = "jpeg_incompressibility"
    batch_size: int = 8
    """Images scored together by a reward model (aesthetic, alignment); a call that runs
    out of GPU memory is scored again with half as many, for the rest of the run."""
    overlap: str = "auto"
    """Score a batch in a worker thread while the next one samples: on, off, or auto
    (on for CPU rewards such as JPEG when sampling runs on a GPU; off for reward models,
    which would share the GPU with sampling, and for CPU-only runs)."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """aesthetic, clipscore: the CLIP model that embeds the images (hub id or folder)."""
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    """pickscore: the PickScore CLIP model (hub id or folder)."""
    pickscore_tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """pickscore: where its tokenizer comes from (PickScore_v1 ships none: the CLIP it was
    tuned from); empty: the model's own folder."""
    head_weights: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
    """aesthetic: LAION's linear head (.pth state dict or .safetensors): a local file or
    a hub file as "org/repo/path/in/repo"."""
    hps_weights: str = "xswu/HPSv2/HPS_v2.1_compressed.pt"
    """hpsv2: the official open_clip checkpoint (HPS_v2.1_compressed.pt, or v2.0's
    HPS_v2_compressed.pt), a local file or a hub file as "org/repo/file", converted to
    transformers' CLIPModel when loaded; or a transformers CLIPModel folder or hub id."""
    hps_tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """hpsv2: its tokenizer (the CLIP it was tuned from; hub id or folder); empty: the
    folder of hps_weights, when that is a transformers folder."""
    imagereward_weights: str = "THUDM/ImageReward/ImageReward.pt"
    """imagereward: the official checkpoint (ImageReward.pt, or .safetensors with the same
    names), a local file or a hub file as "org/repo/file"."""
    imagereward_tokenizer: str = "bert-base-uncased"
    """imagereward: its BERT tokenizer (hub id or folder)."""
    captioner: str = "http"
    """prompt_alignment: "http" (an OpenAI-compatible chat-completions server) or "local"
    (a transformers vision-language model loaded for the reward phase)."""
    captioner_url: str = "http://127.0.0.1:8000/v1"
    captioner_model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"
    """The VLM: a hub id or folder (local), or the model name the server expects (http)."""
    captioner_4bit: bool = False
    """local captioner in 4-bit (bitsandbytes, CUDA)."""
    captioner_timeout: float = 60.0
    captioner_retries: int = 3
    captioner_parallel: int = 8
    captioner_api_key: str = ""
    question: str = "Answer concisely: what is going on in this image?"
    reference_template: str = "The image contains {prompt}"
    """BERTScore's reference sentence; {prompt} is replaced by the image's prompt."""
    bertscore_model: str = "roberta-large"
    bertscore_layer: int = 17
    mix: dict[str, float] = field(default_factory=dict)
    """name = "mix": the weighted sum of these rewards, e.g. {aesthetic = 1.0,
    pickscore = 0.5}; each component is logged (reward_<name>_mean)."""


@dataclass
class PromptConfig:
    source: str = "imagenet_animals"
    """A built-in prompt set name or a text file of prompts, one per line."""
    prompts: list[str] = field(default_factory=list)
    """An explicit list; when not empty it replaces ``source``."""
    eval_source: str = ""
    """Prompts never trained on, scored every ``run.eval_every`` epochs (generalisation)."""


@dataclass
class StatsConfig:
    per_prompt: bool = True
    """Normalise rewards per prompt (running buffer) instead of over the whole batch."""
    buffer_size: int = 16
    min_count: int = 16
    global_std: bool = False
    """GRPO: divide by the std of all the epoch's rewards instead of each group's
    (Flow-GRPO's ``global_std``: a group of near-equal rewards is not blown up)."""


@dataclass
class RunConfig:
    epochs: int = 100
    seed: int = 42
    output: str = ""
    """Run folder; empty means runs/<preset>."""
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    grid_every: int = 10
    """Render the fixed grid every N epochs (0: only before and after training; -1: never,
    as the speed benchmark does)."""
    grid_prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog", "a fox"])
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    eval_every: int = 0
    """Score the ``prompts.eval_source`` prompts every N epochs (0: never)."""
    eval_seeds: list[int] = field(default_factory=lambda: [0])
    log_rollouts: bool = False
    """Write the gathered prompts, rewards and advantages of every epoch to rollouts/."""
    progress: bool = True
    log_with: str = "auto"
    """Also log metrics and grids to tensorboard or wandb (RUN/logs/); auto: TensorBoard
    when it is installed, else none (metrics.jsonl and metrics.png are always written)."""


@dataclass
class Config:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- presets


def presets_dir() -> Path:
    """The presets folder: inside the installed wheel, or at the source checkout's root."""
    packaged = Path(__file__).parent / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {
        path.stem: load_preset(path.stem).description
        for path in sorted(presets_dir().glob("*.toml"), key=lambda p: p.stem)
    }


def _preset_path(name_or_path: str, beside: Path | None = None) -> Path:
    """A preset's file: a path (from the folder ``beside``, a preset extending it, then
    from here) or a shipped preset's name."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        for candidate in ([beside / path] if beside and not path.is_absolute() else []) + [path]:
            if candidate.is_file():
                return candidate
        shipped = presets_dir() / path.name
        instead = f"; for the shipped preset drop .toml: {path.stem}" if shipped.is_file() else ""
        raise UserError(f"no preset file {path} (from {beside or Path.cwd()}){instead}")
    candidate = presets_dir() / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = ", ".join(p.stem for p in sorted(presets_dir().glob("*.toml")))
    raise UserError(
        f"unknown preset '{name_or_path}': use one of {known}, or a path to a .toml file "
        "(`lowvram-ddpo presets` lists them)"
    )


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file the user wrote or edited (``what``: "preset", "the run's config"); one
    line where it is not UTF-8 or not valid TOML."""
    try:
        return tomllib.loads(read_user_text(path, what))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{what} {path} is not valid TOML: {err}: fix that line") from None


def _read_preset_tables(
    name_or_path: str, seen: tuple[str, ...] = (), beside: Path | None = None
) -> dict[str, Any]:
    path = _preset_path(name_or_path, beside)
    if str(path) in seen:
        raise UserError(f"preset {path} extends itself in a loop")
    data = read_toml(path, "preset")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"preset {path}: extends must be a preset's name or file, got {parent!r}")
    merged = _read_preset_tables(parent, (*seen, str(path)), path.parent)
    for key, value in data.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged


def own_preset_fields(name_or_path: str) -> list[str]:
    """The dotted fields that a user's own preset files set (the file named and the parents
    it extends, up to the first shipped preset): a fit to the card keeps them, as it keeps
    ``--set`` fields, where it may change a shipped preset's."""
    fields: list[str] = []
    seen: set[Path] = set()
    beside = None
    while name_or_path:
        path = _preset_path(name_or_path, beside).resolve()
        if path.parent == presets_dir().resolve() or path in seen:
            break
        seen.add(path)
        data = read_toml(path, "preset")  # already read once by load_preset
        name_or_path, beside = data.pop("extends", ""), path.parent
        for key, value in data.items():
            subs = value.keys() if isinstance(value, dict) else [None]
            fields += [f"{key}.{sub}" if sub else key for sub in subs]
    return fields


def load_preset(name_or_path: str) -> Config:
    """Read a preset by name (from ``presets/``) or by path, following ``extends``."""
    return config_from_dict(_read_preset_tables(name_or_path), source=name_or_path)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    config = Config()
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                set_field(config, f"{key}.{sub_key}", sub_value, source=source)
        else:
            set_field(config, key, value, source=source)
    return config


def load_config_file(path: Path) -> Config:
    return config_from_dict(read_toml(path, "the config"), source=str(path))


# ---------------------------------------------------------------- overrides


def _field_type(owner: Any, name: str) -> Any:
    return typing.get_type_hints(type(owner))[name]


def _coerce(value: Any, expected: Any, key: str) -> Any:
    origin = typing.get_origin(expected)
    if origin is dict:
        _, item_type = typing.get_args(expected)
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a table like {{aesthetic = 1.0}}, got {value!r}")
        return {str(k): _coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{key} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise UserError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{key} must be an integer, got {value!r}") from None
    if expected is float:
        if isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a number, got {value!r}") from None
    if expected is str:
        return str(value)
    raise TypeError(f"unsupported field type {expected} for {key}")  # pragma: no cover


def set_field(config: Config, key: str, value: Any, source: str = "--set") -> None:
    """Set a dotted field (``train.learning_rate``), converting the value to the field's type."""
    *sections, name = key.split(".")
    owner: Any = config
    for section in sections:
        if not dataclasses.is_dataclass(owner) or section not in _names(owner):
            raise UserError(_unknown_key_message(key, source))
        owner = getattr(owner, section)
    if not dataclasses.is_dataclass(owner) or name not in _names(owner):
        raise UserError(_unknown_key_message(key, source))
    expected = _field_type(owner, name)
    if dataclasses.is_dataclass(expected):
        raise UserError(f"{key} is a section; set one of its fields, e.g. {key}.<field>=...")
    setattr(owner, name, _coerce(value, expected, key))


def _names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def all_keys(config: Config | None = None) -> list[str]:
    config = config or Config()
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{sub}" for sub in _names(value)]
        else:
            keys.append(f.name)
    return keys


def _unknown_key_message(key: str, source: str) -> str:
    section = key.split(".")[0]
    near = [k for k in all_keys() if k.startswith(section + ".")] or all_keys()
    return f"unknown config key '{key}' (from {source}); valid keys: {', '.join(near)}"


def apply_overrides(config: Config, assignments: list[str]) -> None:
    """Apply ``key=value`` strings; values are read as TOML literals when they parse as one."""
    for assignment in assignments:
        if "=" not in assignment:
            raise UserError(f"--set expects key=value, got '{assignment}'")
        key, raw = assignment.split("=", 1)
        set_field(config, key.strip(), _parse_literal(raw.strip()))


def _parse_literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# ---------------------------------------------------------------- validation


def _reward_file_checks(reward: RewardConfig) -> list[tuple[bool, str]]:
    """The files of the rewards in use must be named (empty settings fail here, before
    the diffusion model loads, instead of at the first scoring)."""
    used = set(rewards_in_use(reward))
    settings = {
        "hpsv2": ["hps_weights"],  # hps_tokenizer may be empty: a CLIPModel folder has one
        "imagereward": ["imagereward_weights", "imagereward_tokenizer"],
    }
    return [
        (bool(getattr(reward, field)), f"reward.{field} must not be empty ({name} needs it)")
        for name, fields in settings.items()
        if name in used
        for field in fields
    ]


def validate(config: Config) -> None:
    """Reject settings that cannot work, with a message that says what to change."""
    s, t = config.sample, config.train
    resolution_ok = s.resolution > 0 and s.resolution % 8 == 0
    checks = [
        (
            resolution_ok,
            f"sample.resolution must be a positive multiple of 8 (got {s.resolution})"
            + ("" if resolution_ok else f"; {_resolution_hint(config.model.name)}"),
        ),
        (s.num_steps >= 1, f"sample.num_steps must be at least 1 (got {s.num_steps})"),
        (s.sampler in SAMPLERS, f"sample.sampler must be one of {', '.join(SAMPLERS)}"),
        (s.eta > 0, f"sample.eta must be > 0 for the policy to be stochastic (got {s.eta})"),
        (
            s.noise_level > 0,
            f"sample.noise_level must be > 0 for the flow policy to be stochastic (got "
            f"{s.noise_level}; Flow-GRPO uses 0.7)",
        ),
        (
            s.sampler != "flow-cps" or s.noise_level <= 1,
            f"sample.noise_level must be in (0, 1] for the flow-cps sampler (got "
            f"{s.noise_level}; Flow-GRPO uses 0.8)",
        ),
        (
            s.batch_size >= 1 and s.batches_per_epoch >= 1,
            "sample.batch_size and sample.batches_per_epoch must be at least 1",
        ),
        (
            t.algorithm in ALGORITHMS,
            f"unknown algorithm '{t.algorithm}': use one of {', '.join(ALGORITHMS)}",
        ),
        (s.group_size >= 1, f"sample.group_size must be >= 1 (got {s.group_size})"),
        (
            0 <= s.sde_window <= s.num_steps // 2,
            f"sample.sde_window must be 0 (off) to num_steps // 2 = {s.num_steps // 2}: the "
            f"window starts in the first half of the steps (got {s.sde_window})",
        ),
        (t.nft_beta > 0, f"train.nft_beta must be > 0 (got {t.nft_beta})"),
        (
            t.algorithm != "nft" or config.model.lora_rank > 0,
            "train.algorithm=nft needs LoRA (model.lora_rank > 0): its sampling policy is a "
            "second copy of the LoRA weights",
        ),
        (
            (s.batch_size * s.batches_per_epoch) % max(s.group_size, 1) == 0,
            f"sample.group_size {s.group_size} must divide the epoch's images per process "
            f"(sample.batch_size x batches_per_epoch = {s.batch_size * s.batches_per_epoch})",
        ),
        (
            t.algorithm != "grpo" or s.group_size >= 2,
            "train.algorithm=grpo compares images of one prompt: set sample.group_size >= 2 "
            "(Flow-GRPO uses 16-24)",
        ),
        (
            config.model.mixed_precision in MIXED_PRECISION,
            f"model.mixed_precision must be one of {', '.join(MIXED_PRECISION)}",
        ),
        (config.model.lora_rank >= 0, "model.lora_rank must be >= 0 (0: full fine-tuning)"),
        (
            config.memory.optimizer in OPTIMIZERS,
            f"memory.optimizer must be one of {', '.join(OPTIMIZERS)}",
        ),
        (
            config.memory.quantize in QUANTIZE,
            f"memory.quantize must be one of {', '.join(QUANTIZE)}",
        ),
        (
            config.memory.quantize == "none" or config.model.lora_rank > 0,
            "memory.quantize needs LoRA (model.lora_rank > 0): quantised weights cannot be trained",
        ),
        (
            config.memory.uncheckpointed_levels >= 0,
            "memory.uncheckpointed_levels must be >= 0 (0: every level recomputed)",
        ),
        (
            config.memory.uncheckpointed_levels == 0 or config.memory.gradient_checkpointing,
            "memory.uncheckpointed_levels keeps levels out of gradient checkpointing: set "
            "memory.gradient_checkpointing = true with it, or leave it at 0",
        ),
        (
            not config.memory.keep_attention or config.memory.gradient_checkpointing,
            "memory.keep_attention keeps self-attention's outputs out of gradient "
            "checkpointing's recomputation: set memory.gradient_checkpointing = true with it, "
            "or leave it false",
        ),
        (
            not config.memory.keep_attention or config.memory.attention == "sdpa",
            "memory.keep_attention keeps the outputs of PyTorch's attention kernels: with "
            "memory.attention=xformers it would keep nothing; use memory.attention=sdpa",
        ),
        (
            config.memory.decode_batch >= 1,
            f"memory.decode_batch must be at least 1 (got {config.memory.decode_batch})",
        ),
        (
            config.memory.attention in ATTENTION,
            f"memory.attention must be one of {', '.join(ATTENTION)}",
        ),
        (
            config.speed.compile in COMPILE_MODES,
            f"speed.compile must be one of {', '.join(COMPILE_MODES)}",
        ),
        (
            config.speed.compile_scope in COMPILE_SCOPES,
            f"speed.compile_scope must be one of {', '.join(COMPILE_SCOPES)}",
        ),
        (
            config.speed.compile_scope == "model"
            or config.speed.compile in ("off", *BLOCK_COMPILE_MODES),
            "speed.compile_scope=blocks takes speed.compile=default: the CUDA-graph modes "
            "replay one graph per UNet call; use speed.compile_scope=model",
        ),
        (0 < t.timestep_fraction <= 1, "train.timestep_fraction must be in (0, 1]"),
        (t.kl_coef >= 0 and math.isfinite(t.kl_coef), "train.kl_coef must be >= 0"),
        (
            t.kl_coef == 0 or t.algorithm in (*POLICY_GRADIENT, "nft"),
            "train.kl_coef needs ddpo-is, ddpo-sf, grpo or nft: RWR has no per-step policy "
            "to compare",
        ),
        (
            t.kl_coef == 0 or config.model.lora_rank > 0,
            "train.kl_coef needs LoRA (model.lora_rank > 0): the base model is the UNet with "
            "its adapters off; full fine-tuning keeps no copy of it",
        ),
        (t.max_skipped_steps >= 1, "train.max_skipped_steps must be at least 1"),
        (
            t.batch_size >= 1 and t.gradient_accumulation_steps >= 1 and t.inner_epochs >= 1,
            "train.batch_size, gradient_accumulation_steps and inner_epochs must be >= 1",
        ),
        (
            t.learning_rate > 0 and math.isfinite(t.learning_rate),
            "train.learning_rate must be a positive number",
        ),
        (
            t.clip_range > 0 and math.isfinite(t.clip_range),
            "train.clip_range must be a positive number (the paper's: 1e-4)",
        ),
        (0 <= t.sparse_rwr_percentile < 100, "train.sparse_rwr_percentile must be in [0, 100)"),
        (config.reward.batch_size >= 1, "reward.batch_size must be at least 1"),
        # an unknown reward.name is the trainer's to refuse, before loading: rewards
        # registered in code (``register_reward``) are not in REWARD_NAMES
        *[
            (problem is None, problem or "")
            for problem in map(own_reward_problem, rewards_in_use(config.reward))
        ],
        (
            config.reward.name != "mix" or bool(config.reward.mix),
            "reward.name = mix needs reward.mix, e.g. {aesthetic = 1.0, pickscore = 0.5}",
        ),
        (
            all(
                (name in REWARD_NAMES and name != "mix") or is_own_reward(name)
                for name in config.reward.mix
            ),
            f"reward.mix names unknown rewards {sorted(config.reward.mix)}: use "
            f"{', '.join(n for n in REWARD_NAMES if n != 'mix')}, or {OWN_REWARD_HINT}",
        ),
        *_reward_file_checks(config.reward),
        (
            config.reward.overlap in ("auto", "on", "off"),
            "reward.overlap must be auto, on or off",
        ),
        (
            config.reward.captioner in ("http", "local"),
            "reward.captioner must be http or local",
        ),
        (
            "{prompt}" in config.reward.reference_template,
            "reward.reference_template must contain {prompt}",
        ),
        (config.run.epochs >= 0, "run.epochs must be >= 0"),
        (
            config.run.log_with in LOG_WITH,
            f"run.log_with must be one of {', '.join(LOG_WITH)}",
        ),
        (
            config.run.eval_every == 0 or bool(config.prompts.eval_source),
            "run.eval_every needs prompts.eval_source (a prompt set or file to evaluate on)",
        ),
        (
            config.stats.buffer_size >= 1 and config.stats.min_count >= 1,
            "stats.buffer_size and stats.min_count must be at least 1",
        ),
        (
            len(config.run.grid_seeds) > 0 or config.run.grid_every < 0,
            "run.grid_seeds must not be empty",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    from lowvram_ddpo.memory.units import means_as_written, means_this_card, parse_size

    if not (means_as_written(config.memory.vram) or means_this_card(config.memory.vram)):
        try:
            parse_size(config.memory.vram)
        except UserError:
            raise UserError(
                f"--vram (memory.vram) '{config.memory.vram}' is not a card size: write it "
                "like 8GB, or auto (this machine's GPU), or off (the settings as written)"
            ) from None
    samples = s.batch_size * s.batches_per_epoch
    per_step = t.batch_size * t.gradient_accumulation_steps
    if samples % per_step != 0:
        raise UserError(
            f"each epoch samples {samples} images per process (sample.batch_size x "
            f"sample.batches_per_epoch), which is not a multiple of the {per_step} samples of "
            "one optimiser step (train.batch_size x train.gradient_accumulation_steps): "
            "change one of them so every sample is trained on"
        )


def resumable(assignment: str) -> bool:
    """What ``--set`` may change in a resumed run: memory and speed levers (CUDA graphs off
    after an out-of-memory error), and the training micro-batch (the samples per optimiser
    step stay: the accumulation follows it)."""
    key = assignment.split("=", 1)[0].strip()
    return key.startswith(("memory.", "speed.")) or key == "train.batch_size"


def keep_samples_per_step(config: Config, per_step: int) -> None:
    """After ``train.batch_size`` changed: the accumulation follows, so that an optimiser
    step still takes ``per_step`` samples."""
    t = config.train
    if t.batch_size < 1 or per_step % t.batch_size:
        raise UserError(
            f"train.batch_size {t.batch_size} does not divide the {per_step} samples of an "
            f"optimiser step: pick one of {', '.join(map(str, divisors(per_step)))}"
        )
    t.gradient_accumulation_steps = per_step // t.batch_size


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def set_samples_per_epoch(config: Config, samples: int, processes: int = 1) -> str:
    """Sample ``samples`` images per epoch (all processes together). A user asking for
    fewer samples than one optimiser step holds means it: the step shrinks to fit (fewer
    accumulated micro-batches). Returns a line saying what changed ("" if nothing)."""
    s, t = config.sample, config.train
    if samples < 1:
        raise UserError(f"--samples-per-epoch must be at least 1 (got {samples})")
    per_round = s.batch_size * processes
    if samples % per_round == 0:
        s.batches_per_epoch = samples // per_round
    elif samples < per_round and samples % processes == 0:
        s.batch_size, s.batches_per_epoch = samples // processes, 1
    else:
        raise UserError(
            f"--samples-per-epoch {samples} is not a multiple of sample.batch_size x processes "
            f"({per_round}): pick a multiple or change sample.batch_size with --set"
        )
    per_process = samples // processes
    step = t.batch_size * t.gradient_accumulation_steps
    if per_process % step == 0:
        return ""
    micro = math.gcd(t.batch_size, per_process)
    room = per_process // micro
    accumulation = max(a for a in range(1, t.gradient_accumulation_steps + 1) if room % a == 0)
    before = f"{step} samples (train.batch_size {t.batch_size} x {t.gradient_accumulation_steps})"
    t.batch_size, t.gradient_accumulation_steps = micro, accumulation
    return (
        f"note: one optimiser step took {before}, which --samples-per-epoch {samples} cannot "
        f"fill: now {micro * accumulation} ({micro} x {accumulation}), "
        f"{per_process // (micro * accumulation)} optimiser step(s) per epoch"
    )


def _resolution_hint(model_name: str) -> str:
    from lowvram_ddpo.architectures import likely_native_resolution

    return f"{model_name} was trained at {likely_native_resolution(model_name)} px"


# ---------------------------------------------------------------- writing


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_toml(config: Config) -> str:
    """The resolved config as TOML (the run folder keeps it; ``--resume`` reads it back)."""
    lines = []
    data = to_dict(config)
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    """Bare when TOML allows it, else quoted (an own reward: "my_reward.py:score")."""
    bare = bool(key) and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys are reward names
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


def trained_steps_per_sample(
    sample: SampleConfig, train: TrainConfig, trainable: int | None = None
) -> int:
    """Steps of each sample trained per inner epoch: Flow-GRPO-Fast's window, or
    ``timestep_fraction`` of the steps; for policy gradients at most the policy's
    ``trainable`` steps (a flow model's sharp last step never is)."""
    if sample.sde_window > 0:
        return sample.sde_window
    steps = max(1, round(sample.num_steps * train.timestep_fraction))
    if trainable is not None and train.algorithm in POLICY_GRADIENT:
        steps = min(steps, trainable)
        if steps < 1:
            sharp = sample.num_steps - trainable
            raise UserError(
                f"sample.num_steps={sample.num_steps} leaves {train.algorithm} no step to train "
                f"on this model (its last {sharp} step(s) are deterministic, never trained): "
                f"set sample.num_steps to {sharp + 1} or more"
            )
    return steps
