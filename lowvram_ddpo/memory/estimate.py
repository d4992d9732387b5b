"""Predict a run's accelerator memory per phase without an accelerator.

The models are built on the ``meta`` device from their configs; each phase of an epoch
runs the trainer's own code for one step (a denoising step, one image's decode, one
training micro-step with its backward) under ``DeviceBytesCounter``. What stays on the
device between phases (UNet, LoRA, optimiser state, and the text encoder and VAE when
they are not offloaded) is added from the parameter sizes. The result mirrors what
``Trainer`` keeps where, so the two must change together.

With a CUDA-graph mode of ``speed.compile`` the UNet calls' working memory moves into the
graphs' private pool, kept for the whole run and unusable by the other phases
(``graph_pool_bytes``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lowvram_ddpo import flux2
from lowvram_ddpo.algorithms import POLICY_GRADIENT
from lowvram_ddpo.algorithms.nft import SamplingWeights
from lowvram_ddpo.algorithms.steps import (
    MicroBatch,
    nft_loss,
    no_grad_calls_per_micro_step,
    policy_gradient_loss,
    reward_weighted_loss,
)
from lowvram_ddpo.architectures import Components, build_components, default_architecture
from lowvram_ddpo.config import Config, RewardConfig
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.allocator import expandable_segments_expected
from lowvram_ddpo.memory.calibration import (
    RESERVED_OVER_ALLOCATED_PLAIN,
    decode_working_bytes,
    later_epoch_growth,
    reserved_bytes,
    training_working_bytes,
)
from lowvram_ddpo.memory.checkpointing import disable_checkpointing, enable_checkpointing
from lowvram_ddpo.memory.counting import (
    DeviceBytesCounter,
    GpuKernelEmulation,
    emulated_checkpoint,
)
from lowvram_ddpo.memory.quantisation import quantised_savings
from lowvram_ddpo.memory.report import MemoryReport, PhaseMemory
from lowvram_ddpo.memory.units import module_bytes
from lowvram_ddpo.models import DTYPES, make_trainable, trainable_parameters, use_vae_tiling
from lowvram_ddpo.policy import Conditioning, FlowSDEPolicy, PolicyStep, build_policy
from lowvram_ddpo.rewards import ModelReward, reward_with_random_weights
from lowvram_ddpo.rollout import (
    Trajectories,
    decodes_in_fp32,
    image_tokens,
    latent_shape,
    vae_input,
)
from lowvram_ddpo.speed.compile import graphs_replay
from lowvram_ddpo.speed.half_norms import restore_norms, run_norms_in_half
from lowvram_ddpo.text_encoding import TextEmbeds, micro_conditioning, sd3_t5_tokens

T = TypeVar("T")

ADAM_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 2048}
"""Per trained parameter: two fp32 moments, or two 8-bit moments with a fp32 absmax per
2048-block (bitsandbytes keeps tensors under 4096 elements in 32 bits)."""

BNB_MIN_8BIT_SIZE = 4096


def optimizer_state_bytes(params: list[nn.Parameter], kind: str) -> int:
    total = 0.0
    for p in params:
        per_param = ADAM_STATE_BYTES[kind] if p.numel() >= BNB_MIN_8BIT_SIZE else 8.0
        total += p.numel() * per_param
    return int(total)


@dataclass
class MetaRun:
    """A run's models on the meta device, in the dtypes and with the adapters it trains.

    Built once per model settings (architecture, precision, LoRA, resolution, steps); the
    phase methods take what presets and the auto-fit vary (reward, batch sizes, guidance,
    checkpointing, algorithm) and remember each result."""

    config: Config
    arch: str
    parts: Components = field(init=False)
    policy: PolicyStep = field(init=False)
    dtype: torch.dtype = field(init=False)
    _peaks: dict[tuple, int] = field(default_factory=dict)
    _sizes: dict[tuple, Any] = field(default_factory=dict)
    _rewards: dict[str, ModelReward | None] = field(default_factory=dict)
    half_norms: bool = field(default=False, init=False)
    """Whether the UNet's norms run in half precision (``speed.half_norms``) now."""

    def __post_init__(self) -> None:
        cfg = self.config
        self.dtype = DTYPES[cfg.model.mixed_precision]
        self.parts = build_components(self.arch, "meta", self.dtype, cfg.model.use_t5)
        unet = self.parts.unet
        # full fine-tuning (rank 0): fp32 master weights, autocast runs the matmuls in fp16
        make_trainable(unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
        s = cfg.sample
        self.policy = build_policy(
            s.sampler,
            self.parts.scheduler_config,
            unet.config,
            s.num_steps,
            s.eta,
            s.noise_level,
            image_tokens=image_tokens(unet, self.parts.vae, s.resolution),
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.dtype == torch.float32 else self.dtype

    def sizes(self, key: tuple, compute: Callable[[], T]) -> T:
        """A size of the built models (or their parameter list), computed once: the
        auto-fit asks for the same ones for hundreds of candidate settings, and walking
        SDXL's parameters each time took most of a fit's time."""
        if key not in self._sizes:
            self._sizes[key] = compute()
        return self._sizes[key]

    def use_half_norms(self, on: bool) -> None:
        """The UNet's norms as ``speed.half_norms`` has them (a part of every measured key)."""
        if on != self.half_norms:
            (run_norms_in_half if on else restore_norms)(self.parts.unet)
            self.half_norms = on

    def known(self, key: tuple) -> int | None:
        """The peak already measured for ``key`` with the norms as they are now, or None."""
        return self._peaks.get((*key, self.half_norms))

    def measure(self, key: tuple, work: Callable[[], object], autocast: bool = True) -> int:
        """Peak bytes of what ``work`` allocates on the device (remembered per ``key``: the
        auto-fit asks for the same phase settings many times)."""
        if (peak := self.known(key)) is None:
            peak = self._peaks[(*key, self.half_norms)] = self._measure(work, autocast)
        return peak

    def _measure(self, work: Callable[[], object], autocast: bool = True) -> int:
        counter = DeviceBytesCounter()
        with GpuKernelEmulation(self.autocast_dtype if autocast else None), counter:
            result = work()
            del result
        return counter.peak

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        return latent_shape(self.parts.unet, self.parts.vae, resolution)

    @property
    def sd3(self) -> bool:
        return self.parts.family == "sd3"

    @property
    def flux2(self) -> bool:
        return self.parts.family == "flux2"

    def token_counts(self) -> list[int]:
        """Tokens per prompt of each text encoder: CLIP's 77; SD 3's T5 as many as
        ``text_encoding.sd3_sequence_length`` gives it; FLUX.2's Qwen3 512."""
        if self.flux2:
            return [flux2.TEXT_TOKENS]
        clip = self.parts.text_encoder.config.max_position_embeddings
        counts = [clip for e in (self.parts.text_encoder, self.parts.text_encoder_2) if e]
        t5 = self.parts.text_encoder_3
        return counts + ([sd3_t5_tokens(True, clip)] if t5 is not None else [])

    def text_shape(self) -> tuple[int, int]:
        """(tokens, width) of the denoiser's text conditioning: SDXL's two encoders side by
        side; SD 3's CLIPs side by side, then T5's tokens (zeros without T5); FLUX.2's three
        Qwen3 layers side by side."""
        if self.flux2:
            return flux2.TEXT_TOKENS, self.parts.unet.config.joint_attention_dim
        clip = self.parts.text_encoder.config.max_position_embeddings
        if not self.sd3:
            return clip, self.parts.unet.config.cross_attention_dim
        t5 = sd3_t5_tokens(self.parts.text_encoder_3 is not None, clip)
        return clip + t5, self.parts.unet.config.joint_attention_dim

    def pooled_width(self) -> int | None:
        if self.flux2:
            return None
        if self.sd3:
            return self.parts.unet.config.pooled_projection_dim
        second = self.parts.text_encoder_2
        return None if second is None else second.config.projection_dim

    def text_embeds(self, batch: int, device: str = "meta") -> TextEmbeds:
        length, width = self.text_shape()
        hidden = torch.zeros(batch, length, width, device=device, dtype=self.dtype)
        pooled_width = self.pooled_width()
        if pooled_width is None:
            return TextEmbeds(hidden)
        pooled = torch.zeros(batch, pooled_width, device=device, dtype=self.dtype)
        return TextEmbeds(hidden, pooled)

    def time_ids(self) -> Tensor | None:
        return micro_conditioning(self.parts.unet.config, self.config.sample.resolution)

    @property
    def upcasts_vae(self) -> bool:
        return decodes_in_fp32(self.parts.vae, sdxl=self.parts.family == "sdxl")

    @property
    def decodes_in_half(self) -> bool:
        """Whether the VAE decodes in 16 bits (under autocast), as the calibrated row did."""
        return self.dtype != torch.float32 and not self.upcasts_vae

    def _conditioning(self, batch: int, guidance: float) -> Conditioning:
        text = self.text_embeds(batch)
        return Conditioning.of(text, text if guidance != 1.0 else None, guidance, self.time_ids())

    # ---------------------------------------------------------------- phases

    def encode_prompts(self, batch: int) -> int:
        """Every text encoder in turn, their outputs kept until the last has run."""
        # SDXL, SD 3 and FLUX.2 read hidden layers
        several = len(self.parts.text_encoders) > 1 or self.flux2
        encoders = list(zip(self.parts.text_encoders, self.token_counts(), strict=True))

        def work() -> list:
            return [
                e(
                    torch.zeros(batch, n, dtype=torch.long, device="meta"),
                    output_hidden_states=several,
                )[0]
                for e, n in encoders
            ]

        with torch.no_grad():
            return self.measure(("encode", batch), work)

    def denoising_step(self, batch: int, guidance: float) -> int:
        """One denoising step of a sampling batch (classifier-free guidance, when the policy
        uses it, doubles the UNet's batch inside the policy, as in sampling)."""
        key = ("sampling", batch, guidance)
        # before the set-up: eval() walks SDXL's 7,000 modules
        if (peak := self.known(key)) is not None:
            return peak
        unet, cond = self.parts.unet, self._conditioning(batch, guidance)
        unet.eval()
        latents = torch.empty(
            batch, *self.latent_shape(self.config.sample.resolution), device="meta"
        )
        t = self.policy.timesteps()[:1].repeat(batch)

        def step() -> torch.Tensor:
            out = self.policy(unet, latents, t, cond)
            return out.log_prob(out.mean)

        with torch.no_grad():
            return self.measure(key, step)

    def reward_model(self, reward: RewardConfig) -> ModelReward | None:
        """The reward's network on the meta device (None for rewards without one), built
        once per reward: presets of one model share the model's measurements."""
        key = repr(reward)
        if key not in self._rewards:
            self._rewards[key] = reward_with_random_weights(reward, self.dtype)
        return self._rewards[key]

    def score_rewards(self, reward_config: RewardConfig, batch: int) -> int:
        """One scoring micro-batch of decoded images (0 for rewards without a network)."""
        reward = self.reward_model(reward_config)
        if reward is None:
            return 0
        size = self.config.sample.resolution
        prompts = [""] * batch

        def work() -> Tensor:
            return reward.score(torch.empty(batch, 3, size, size, device="meta"), prompts)

        with torch.no_grad():
            return self.measure(("reward", repr(reward_config), batch), work)

    def decode(self, tiling: bool, batch: int = 1, own_dtype: bool = False) -> int:
        """The working peak of decoding ``batch`` images at once (``memory.decode_batch``),
        outside autocast in the VAE's own dtype with ``own_dtype`` (``speed.half_decode``)."""
        key = ("decode", tiling, batch, own_dtype)
        if (peak := self.known(key)) is not None:  # before the VAE's casts below
            return peak
        vae = self.parts.vae
        z = torch.empty(batch, *self.latent_shape(self.config.sample.resolution), device="meta")
        upcast = self.upcasts_vae  # read before the cast below changes the VAE's dtype
        dtype = torch.float32 if upcast else self.dtype
        torch.nn.Module.to(vae, dtype)  # as rollout.decode_latents casts it
        use_vae_tiling(vae, tiling)
        try:
            with torch.no_grad():
                return self.measure(
                    key,
                    lambda: vae.decode(vae_input(vae, z.to(dtype))).sample.float(),
                    autocast=not (upcast or own_dtype),
                )
        finally:
            torch.nn.Module.to(vae, self.dtype)

    def training_micro_step(self, config: Config) -> int:
        """One micro-step's forward and backward with gradients already accumulated."""
        t, guidance = config.train, config.sample.guidance_scale
        m = config.memory
        checkpointing = (m.gradient_checkpointing, m.uncheckpointed_levels, m.keep_attention)
        key = ("training", t.batch_size, checkpointing, t.algorithm, guidance, t.kl_coef > 0)
        if (peak := self.known(key)) is not None:
            return peak
        params = trainable_parameters(self.parts.unet)
        for p in params:  # steady state: earlier micro-steps left their gradients
            p.grad = torch.empty_like(p)
        try:
            return self.measure(key, self.training_work(config))
        finally:
            for p in params:
                p.grad = None

    def training_work(self, config: Config) -> Callable[[], None]:
        """One training micro-step (forward and backward) of ``config``'s micro-batch and
        checkpointing setting, ready to run on the meta device."""
        t, guidance = config.train, config.sample.guidance_scale
        unet, micro_batch = self.parts.unet, t.batch_size
        m = config.memory
        if m.gradient_checkpointing:
            checkpoint = emulated_checkpoint(self.autocast_dtype, m.keep_attention)
            enable_checkpointing(unet, checkpoint, m.uncheckpointed_levels)
        else:
            disable_checkpointing(unet)
        unet.train()
        samples = self._cpu_trajectories(micro_batch)
        batch = MicroBatch(
            samples=torch.arange(micro_batch), steps=torch.zeros(micro_batch, dtype=torch.long)
        )
        signal = torch.zeros(micro_batch)

        def step() -> None:
            if t.algorithm in POLICY_GRADIENT:
                loss, _ = policy_gradient_loss(
                    t.algorithm,
                    unet,
                    self.policy,
                    samples,
                    batch,
                    signal,
                    samples.text(slice(0, 1)) if guidance != 1.0 else None,
                    guidance,
                    t.clip_range,
                    t.kl_coef,
                )
            elif t.algorithm == "nft":
                assert isinstance(self.policy, FlowSDEPolicy), "NFT trains flow models"
                loss, _ = nft_loss(
                    unet,
                    self.policy,
                    samples,
                    batch,
                    signal,
                    torch.Generator().manual_seed(0),
                    self.sampling_weights(),
                    t.nft_beta,
                    t.adv_clip_max,
                    t.kl_coef,
                )
            else:
                generator = torch.Generator().manual_seed(0)
                loss, _ = reward_weighted_loss(
                    unet, self.policy.scheduler, samples, batch, signal, generator
                )
            # not loss.backward(): a function mode is switched off while it handles a call,
            # and checkpointing recomputes inside backward, where the emulation must be on
            torch.autograd.backward(loss)

        return step

    def sampling_weights(self) -> SamplingWeights:
        """NFT's lagging copy of the LoRA weights (on the meta device, as they are)."""
        if not hasattr(self, "_sampling_weights"):
            self._sampling_weights = SamplingWeights(trainable_parameters(self.parts.unet))
        return self._sampling_weights

    def _cpu_trajectories(self, batch: int) -> Trajectories:
        """Stand-in stored rollouts (they live on the CPU, as in training)."""
        text = self.text_embeds(batch, device="cpu")
        shape = self.latent_shape(self.config.sample.resolution)
        return Trajectories(
            prompts=[""] * batch,
            prompt_embeds=text.hidden,
            latents=torch.zeros(batch, 2, *shape),
            log_probs=torch.zeros(batch, 1),
            timesteps=self.policy.timesteps()[:1],
            images=None,
            pooled_embeds=text.pooled,
            time_ids=self.time_ids(),
        )


_RECENT_RUNS: dict[tuple, MetaRun] = {}
RECENT_RUNS_KEPT = 32
"""Meta models held at once (~30 MB of Python objects each for SDXL, no tensor data)."""


def meta_run(config: Config, arch: str) -> MetaRun:
    """A ``MetaRun`` for ``config``'s model settings, reused while they stay the same:
    `bench memory` estimates and then fits the next card down, `--vram` tries several card
    sizes, and each new meta model would measure every phase again (seconds each for SDXL)."""
    m = config.model  # its name does not count: ``arch`` says which shapes are built
    key = (
        arch,
        m.mixed_precision,
        m.lora_rank,
        m.lora_alpha,
        tuple(m.lora_targets),
        config.sample.sampler,
        config.sample.num_steps,
        config.sample.eta,
        config.sample.noise_level,
        config.sample.resolution,
        m.use_t5,
    )
    run = _RECENT_RUNS.pop(key, None) or MetaRun(copy.deepcopy(config), arch)
    _RECENT_RUNS[key] = run  # the most recently used last: the least recently used goes
    if len(_RECENT_RUNS) > RECENT_RUNS_KEPT:
        _RECENT_RUNS.pop(next(iter(_RECENT_RUNS)))
    return run


def readable_shape(config: Config, model: str) -> tuple[str, bool]:
    """(the architecture to estimate ``model`` with, whether it was guessed): the model's
    own configs (a folder, or a few KB from the hub) where they can be read, else the
    shape such a model most likely has (``default_architecture``)."""
    try:
        meta_run(config, model)  # kept for what asks next
        return model, False
    except UserError:
        return default_architecture(model), True


def estimate_memory(config: Config, arch: str, run: MetaRun | None = None) -> MemoryReport:
    """Predicted peak accelerator memory of each phase of one epoch of ``config``.

    ``run`` reuses models already built on the meta device (the auto-fit tries many
    settings of one run); it must have been built from the same model settings.
    """
    run = run or meta_run(config, arch)
    run.use_half_norms(config.speed.half_norms)
    m, s = config.memory, config.sample
    unet, vae = run.parts.unet, run.parts.vae
    saved, dequantised = run.sizes(
        ("quantised", m.quantize), lambda: quantised_savings(unet, m.quantize)
    )
    params = run.sizes(("trainable",), lambda: trainable_parameters(unet))
    # what stays on the device through the whole epoch (Adam's state exists after step 1)
    resident = {
        "unet": run.sizes(("unet",), lambda: module_bytes(unet)) - saved,
        "optimizer state": run.sizes(
            ("optimizer", m.optimizer), lambda: optimizer_state_bytes(params, m.optimizer)
        ),
    }
    # fp32 while decoding
    vae_bytes = run.sizes(("vae",), lambda: module_bytes(vae)) * (2 if run.upcasts_vae else 1)
    for_phase = {"vae": vae_bytes}
    if not m.text_encoders_on_cpu:  # on the CPU they never visit the card
        for_phase["text encoder"] = run.sizes(
            ("text encoders",), lambda: sum(module_bytes(e) for e in run.parts.text_encoders)
        )
    reward_model = run.reward_model(config.reward)
    scorer = (
        {}
        if reward_model is None
        else {"reward model": run.sizes(("reward", repr(config.reward)), reward_model.device_bytes)}
    )
    if config.train.algorithm == "nft":  # its sampling policy: a second copy of the LoRA
        resident["sampling weights"] = run.sizes(
            ("gradients",),
            lambda: sum(p.nbytes for p in params),  # one copy of them
        )
    if not m.offload:
        resident |= for_phase | scorer

    encode_peak = 0 if m.text_encoders_on_cpu else run.encode_prompts(s.batch_size)
    step_peak = run.denoising_step(s.batch_size, s.guidance_scale)
    # a compiled decoder is calibrated on autocast's meta figure, with or without half_decode
    compiled_decode = config.speed.compile_decoder and not m.vae_tiling
    own_dtype = config.speed.half_decode and not compiled_decode
    decode_peak = run.decode(m.vae_tiling, min(m.decode_batch, s.batch_size), own_dtype)
    decode_peak = decode_working_bytes(decode_peak, run.decodes_in_half, compiled_decode)
    reward_peak = run.score_rewards(config.reward, config.reward.batch_size)
    overlapped = reward_model is not None and config.reward.overlap == "on"
    train_peak = training_working_bytes(run.training_micro_step(config), config)
    pool = graph_pool_bytes(config, run, step_peak, train_peak)
    if pool:  # the graphed calls' working memory is the pool's, from the first epoch on
        resident["CUDA graph pool"] = pool
        train_peak = 0
        step_peak = 0 if graphs_replay(config.speed, "sampling") else step_peak

    def phase(
        name: str, peak: int, loaded: dict[str, int] | None = None, also: dict | None = None
    ) -> PhaseMemory:
        """``loaded``: moved in for this phase when offloading; ``also``: held in any case."""
        held = resident | ((loaded or {}) if m.offload else {}) | (also or {})
        allocated = sum(held.values()) + peak
        reserved = reserved_bytes(allocated, pool, later_epoch_growth(config.speed.compile))
        return PhaseMemory(name, allocated, reserved, held)

    grads = {"gradients": run.sizes(("gradients",), lambda: sum(p.nbytes for p in params))}
    phases = [
        phase("encode", encode_peak, {k: v for k, v in for_phase.items() if k != "vae"}),
        # a reward model scoring in a worker thread shares the card with sampling
        phase(
            "sampling",
            step_peak + dequantised + (reward_peak if overlapped else 0),
            loaded=scorer if overlapped else None,
        ),
        phase("decode", decode_peak, {"vae": for_phase["vae"]}),
        phase("reward", reward_peak, loaded=scorer),
        phase("training", train_peak + dequantised, also=grads),
    ]
    notes = [] if expandable_segments_expected() else [PLAIN_ALLOCATOR_NOTE]
    return MemoryReport("estimate", arch, settings_of(config), phases, notes)


PLAIN_ALLOCATOR_NOTE = (
    f"no expandable segments on this machine (Windows, or your PYTORCH_CUDA_ALLOC_CONF): "
    f"reserved counted at {RESERVED_OVER_ALLOCATED_PLAIN}x the allocated bytes, as measured "
    "with PyTorch's default allocator (1.11x with them)"
)


def graph_pool_bytes(config: Config, run: MetaRun, step_peak: int, train_peak: int) -> int:
    """The CUDA graphs' private memory pool (0 without a CUDA-graph mode): the working
    memory of the training micro-step's graphs (``train_peak``: forward and backward), of
    the calls without gradients it makes (NFT's old policy, the KL guard's base model: a
    graph each), and of the sampling step's (``step_peak``) when it is graphed
    (``compile.graphs_replay``). Measured on an H200 (2026-11-26, SD 1.5, both calls
    graphed) the pool behaved as the sum, not the larger, of the two: with it the
    estimate gave 12.6 GiB reserved at micro-batch 4 against 11.98 measured in the first
    epoch. Later epochs reserved 1.0-1.4 GiB more (H200 and H100): the reserved figure adds
    ``calibration.GRAPHS_LATER_EPOCH_GROWTH``. The training graphs alone (H100, micro-batch
    8): 20.70 estimated before that growth, 20.34 and then 21.75 measured. Under
    Inductor's ``reduce-overhead`` (H100, 2026-11-27, micro-batch 4, both graphed) the
    run reserved 5.16-5.21 GiB beyond what it allocated after its first epoch (the pool,
    inferred), where the estimate's sum is 6.25 and the measured parts add to 5.88 (0.80
    of sampling's working memory, 5.08 of training's: cudagraph trees share part of it):
    the sum is kept, the safe side, and no later growth is added there
    (``calibration.later_epoch_growth``).
    The extra calls' graphs are not measured yet."""
    speed, t = config.speed, config.train
    if not graphs_replay(speed, "training"):
        return 0
    extra = no_grad_calls_per_micro_step(t.algorithm, t.kl_coef)
    guidance = 1.0 if t.algorithm == "nft" else config.sample.guidance_scale  # NFT: CFG-free
    no_grad = extra * run.denoising_step(t.batch_size, guidance) if extra else 0
    sampling = step_peak if graphs_replay(speed, "sampling") else 0
    return train_peak + no_grad + sampling


def settings_of(config: Config) -> dict[str, object]:
    """The settings that decide the footprint, as the report prints them."""
    m, s, t = config.memory, config.sample, config.train
    return {
        "resolution": s.resolution,
        "mixed_precision": config.model.mixed_precision,
        "lora_rank": config.model.lora_rank,
        "sample_batch": s.batch_size,
        "train_micro_batch": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "guidance_scale": s.guidance_scale,
        "gradient_checkpointing": m.gradient_checkpointing,
        "uncheckpointed_levels": m.uncheckpointed_levels,
        "keep_attention": m.keep_attention,
        "offload": m.offload,
        "optimizer": m.optimizer,
        "quantize": m.quantize,
        "attention": m.attention,
        "vae_tiling": m.vae_tiling,
        "decode_batch": m.decode_batch,
        "text_encoders_on_cpu": m.text_encoders_on_cpu,
        "compile": config.speed.compile,
        "compile_scope": config.speed.compile_scope,
        "compile_decoder": config.speed.compile_decoder,
        "half_decode": config.speed.half_decode,
        "graph_sampling": config.speed.graph_sampling,
        "fused_lora": config.speed.fused_lora,
        "half_norms": config.speed.half_norms,
        "channels_last": config.speed.channels_last,
        "cudnn_benchmark": config.speed.cudnn_benchmark,
    }
