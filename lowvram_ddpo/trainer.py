"""The training loop, top to bottom: sample -> reward -> advantages -> train -> checkpoint.

Runs on ``accelerate``: one process per GPU under ``accelerate launch``; rewards and
per-prompt statistics are gathered so every process computes the same advantages.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from lowvram_ddpo import flux2
from lowvram_ddpo.algorithms import (
    POLICY_GRADIENT,
    PerPromptStatTracker,
    clip_advantages,
    group_advantages,
    rwr_weights,
    sparse_rwr_weights,
)
from lowvram_ddpo.algorithms.nft import SamplingWeights, old_policy_decay, optimality
from lowvram_ddpo.algorithms.steps import (
    MicroBatch,
    nft_loss,
    policy_gradient_loss,
    reward_weighted_loss,
)
from lowvram_ddpo.atomic import write_text_atomic
from lowvram_ddpo.checkpoint import (
    check_epochs_left,
    epochs_done,
    latest_checkpoint,
    load_checkpoint,
    refresh_exports,
    restore_rng_states,
    save_checkpoint,
)
from lowvram_ddpo.config import (
    Config,
    divisors,
    dump_toml,
    rewards_in_use,
    trained_steps_per_sample,
)
from lowvram_ddpo.device_transfer import to_device
from lowvram_ddpo.divergence import DivergenceGuard, NonFiniteTraining
from lowvram_ddpo.epoch_metrics import (
    TrainingTotals,
    format_metric,
    replay_miss,
    replay_warning,
)
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.grid import make_grid
from lowvram_ddpo.memory.check import memory_check_line
from lowvram_ddpo.memory.checkpointing import (
    check_uncheckpointed_levels,
    checkpoint_function,
    enable_checkpointing,
    resolution_levels,
)
from lowvram_ddpo.memory.fp8_weights import keep_out_of_ddp_sync, store_weights_in_fp8
from lowvram_ddpo.memory.meter import PhaseMeter, peak_piece, phase_seconds_since
from lowvram_ddpo.memory.narrowing import NarrowingWidth
from lowvram_ddpo.memory.units import GB
from lowvram_ddpo.models import (
    DTYPES,
    has_lora,
    load_pipeline,
    make_trainable,
    show_loading_bars,
    tiles_as_configured,
    use_attention,
    use_vae_tiling,
    with_denoiser_as_unet,
)
from lowvram_ddpo.offload import Offloader
from lowvram_ddpo.optimizers import build_optimizer
from lowvram_ddpo.policy import FlowSDEPolicy, build_policy
from lowvram_ddpo.preflight import (
    check_algorithm_fits,
    is_flow_index,
    replay_note,
    resolution_note,
    saved_model_index,
    saved_model_json,
    unknown_words_note,
)
from lowvram_ddpo.processes import world_size
from lowvram_ddpo.prompts import load_prompts
from lowvram_ddpo.reporting.metrics_chart import (
    METRICS_CHART,
    decoded,
    read_metrics,
    write_metrics_chart,
)
from lowvram_ddpo.reporting.progress import TimeLeft
from lowvram_ddpo.reporting.trackers import NoTracker, Tracker, build_tracker, resolve_log_with
from lowvram_ddpo.rewards import (
    ModelReward,
    Reward,
    build_reward,
    check_reward_names,
    check_rewards,
)
from lowvram_ddpo.rollout import (
    Trajectories,
    decode_width,
    image_tokens,
    render,
    sample_trajectories,
)
from lowvram_ddpo.speed.channels_last import convolutions_in_channels_last
from lowvram_ddpo.speed.compile import (
    check_compile_mode,
    compile_unet,
    graphs_replay,
    sampling_calls,
    split_graph_note,
    uncompiled_calls,
)
from lowvram_ddpo.speed.compile_decoder import (
    DecodeShape,
    check_decoder_compiler,
    compile_decoder,
)
from lowvram_ddpo.speed.compile_payoff import mark_compiled
from lowvram_ddpo.speed.cuda_graphs import (
    GRAPH_EVENTS,
    graph_events_counted,
    graph_events_piece,
    graph_events_since,
    recorded_again_note,
)
from lowvram_ddpo.speed.half_norms import run_norms_in_half
from lowvram_ddpo.speed.lora_casts import skip_lora_input_casts
from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers
from lowvram_ddpo.speed.time_model import check_line
from lowvram_ddpo.text_encoding import PromptCache, encode_negative, text_encoders

ENCODED_FIRST = 1024
"""Training prompts encoded before the first epoch, at most (``prompts_to_encode_first``)."""


def epoch_generator(seed: int, epoch: int, process: int, stream: int) -> torch.Generator:
    """An independent, reproducible RNG stream per (seed, epoch, process, purpose):
    resuming at epoch N draws exactly what an uninterrupted run would have drawn."""
    state = np.random.SeedSequence([seed, epoch, process, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


SAMPLING_STREAM, TRAINING_STREAM = 0, 1
SCALER_HALVINGS = 16
"""Skipped steps an fp16 gradient scaler needs to go from its initial scale 2**16 to 1."""


def resolve_mixed_precision(requested: str, on_gpu: bool) -> str:
    if requested != "no" and not on_gpu:
        print(f"note: no GPU found, running in fp32 instead of {requested}")
        return "no"
    return requested


def keeps_bf16_on_cpu(pipe: DiffusionPipeline, dtype: torch.dtype) -> bool:
    """FLUX.2's Qwen3-4B stays bf16 on the CPU in a bf16 run: 8 GB of RAM instead of fp32's
    16, for each prompt's one encoding; smaller encoders go to fp32, as before."""
    return dtype == torch.bfloat16 and flux2.is_flux2(pipe)


@dataclass
class Trainer:
    config: Config
    run_dir: Path
    accelerator: Accelerator = field(init=False)
    pipeline: DiffusionPipeline | None = None
    """An already built pipeline (the memory benchmark's random-weight models); None loads
    ``config.model.name``."""
    reward: Reward | None = None
    """An already built reward (the benchmark's random-weight scorer); None builds
    ``config.reward``."""
    phase: str = "setting up"
    """What the loop is doing now, for error messages."""
    meter: PhaseMeter = field(default_factory=lambda: PhaseMeter(release=True))
    """Each phase's peak memory and seconds; each phase starts on a released allocator
    cache (what a phase reserves is then its own, as the memory estimate takes it)."""
    dashboard: Tracker = field(default_factory=NoTracker)
    """TensorBoard, wandb or nothing (``run.log_with``), on the main process."""
    narrowing: threading.Lock = field(default_factory=threading.Lock)
    """Held while a narrowing is written: a reward scoring in its worker thread and the
    decode may both narrow (one temporary file name for the config)."""

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.config
        precision = resolve_mixed_precision(cfg.model.mixed_precision, torch.cuda.is_available())
        self.accelerator = Accelerator(
            # cpu=True is what lets `accelerate launch --cpu` / torchrun run several CPU processes
            cpu=not torch.cuda.is_available(),
            mixed_precision=precision,
            # x the steps trained per sample, known once the policy is built (below)
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        )
        torch.backends.cuda.matmul.allow_tf32 = cfg.model.allow_tf32
        torch.backends.cudnn.benchmark = cfg.speed.cudnn_benchmark
        set_seed(cfg.run.seed)
        self.check_before_loading()
        self.load_models(DTYPES[precision])
        self.prepare_training()
        self.load_reward(DTYPES[precision])
        # what moved off the card (or was converted on it: 16-bit weights) must not stay
        # reserved
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        s = cfg.sample
        self.policy = build_policy(
            s.sampler,
            self.pipe.scheduler.config,
            self.pipe.unet.config,
            s.num_steps,
            s.eta,
            s.noise_level,
            s.sde_window,
            image_tokens(self.pipe.unet, self.pipe.vae, s.resolution),
        )
        flux2.check_guidance(self.pipe, s.guidance_scale)
        self.accelerator.gradient_accumulation_steps = (
            cfg.train.gradient_accumulation_steps * self.trained_steps_per_sample()
        )
        check_algorithm_fits(cfg, flow=isinstance(self.policy, FlowSDEPolicy))
        self.tracker = PerPromptStatTracker(
            cfg.stats.buffer_size, cfg.stats.min_count, cfg.stats.per_prompt
        )
        self.prompts = load_prompts(cfg.prompts.source, cfg.prompts.prompts)
        for note in (
            resolution_note(self.pipe, cfg.sample.resolution, cfg.model.name),
            # of the shipped pocket model's words: not of a pipeline given by the caller
            # (`bench speed` gives random weights, whose tokenizer knows other words)
            None
            if self.pipeline is not None
            else unknown_words_note(self.pipe, self.prompts + cfg.run.grid_prompts, cfg.model.name),
            replay_note(cfg, self.accelerator.device.type, self.accelerator.mixed_precision),
        ):
            if note:
                self.log(note)
        self.prompt_cache = PromptCache()
        self.decode_width = decode_width(cfg.memory.decode_batch)  # narrows on out-of-memory
        # its own phase: the text encoders' peak is not the epochs' (bench memory shows it)
        with self.meter.phase("encode"), self.offloader.loaded("text_encoder"):
            negative = encode_negative(self.pipe, cfg.sample.negative_prompt)
            if not cfg.memory.text_encoders_on_cpu:  # one visit: the epochs then move none
                with self.accelerator.autocast():  # as sampling encodes: the same values
                    self.prompt_cache.warm(
                        self.pipe,
                        self.prompts_to_encode_first(),
                        progress=cfg.run.progress and self.is_main,
                    )
        self.negative = negative.to(self.accelerator.device)  # a few KB, used by every step

    def prompts_to_encode_first(self) -> list[str]:
        """What setup encodes in the text encoders' one visit, until the cache is full: the
        grid's prompts, the training prompts if there are at most ``ENCODED_FIRST`` (a
        paper preset has 45-398; a longer list is encoded as its prompts are drawn), then
        the evaluation's (the main process evaluates)."""
        cfg = self.config
        first = list(cfg.run.grid_prompts)
        first += self.prompts if len(self.prompts) <= ENCODED_FIRST else []
        if cfg.run.eval_every > 0 and cfg.prompts.eval_source and self.is_main:
            first += load_prompts(cfg.prompts.eval_source)
        return first

    def check_before_loading(self) -> None:
        """What can be refused before minutes of model loading: the settings against the
        saved model's index, the compile mode against the device, the reward's name."""
        cfg = self.config
        index = None if self.pipeline else saved_model_index(cfg.model.name, cfg.model.revision)
        if index is not None:
            flow = is_flow_index(index)
            if flow is not None:
                check_algorithm_fits(cfg, flow)
            flux2.check_index_guidance(index, cfg.sample.guidance_scale)
        check_compile_mode(cfg.speed.compile, self.accelerator.device)
        check_decoder_compiler(cfg.speed.compile_decoder, self.accelerator.device)
        if self.reward is None:
            check_reward_names(rewards_in_use(cfg.reward))
        kept = cfg.memory.uncheckpointed_levels
        if kept and (levels := self.denoiser_levels(index)) is not None:
            check_uncheckpointed_levels(kept, *levels)

    def denoiser_levels(self, index: dict | None) -> tuple[int, str] | None:
        """(resolution levels, class name) of the denoiser to load, from its saved config
        (a given pipeline's own denoiser in tests); None where that is not at hand."""
        if self.pipeline is not None:
            pipe = self.pipeline
            denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
            if denoiser is None:
                return None
            return len(resolution_levels(denoiser)), type(denoiser).__name__
        if index is not None and is_flow_index(index):
            return 0, str(index.get("transformer", ["", "a transformer"])[-1])
        cfg = self.config.model
        unet = saved_model_json(cfg.name, "unet/config.json", cfg.revision)
        if unet is None:
            return None
        return len(unet.get("down_block_types", ())), str(unet.get("_class_name", "UNet"))

    def load_models(self, dtype: torch.dtype) -> None:
        """The pipeline, each module placed where ``memory.offload`` wants it (an fp8
        denoiser once converted, in ``prepare_training``)."""
        cfg, m = self.config, self.config.memory
        show_loading_bars(cfg.run.progress and self.is_main)
        self.pipe = with_denoiser_as_unet(
            self.pipeline
            or load_pipeline(
                cfg.model.name,
                dtype,
                cfg.model.revision,
                quantize=m.quantize,
                lcm_lora=cfg.model.lcm_lora,
                use_t5=cfg.model.use_t5,
            )
        )
        self.pipe.set_progress_bar_config(disable=True)
        text = text_encoders(self.pipe)
        for module in (text, self.pipe.vae, self.pipe.unet):
            module.requires_grad_(False)
        self.offloader = Offloader(self.accelerator.device, enabled=m.offload)
        # a quantised UNet is loaded onto the GPU by bitsandbytes and cannot be moved; an
        # fp8 one goes to the card once converted (prepare_training), never at 16 bits
        if m.quantize == "none":
            self.offloader.register("unet", self.pipe.unet, stays=True)
        if m.text_encoders_on_cpu and not keeps_bf16_on_cpu(self.pipe, dtype):
            text.float()  # CPUs are slow (or unable) in fp16, and slow in bf16 without AMX
        self.offloader.register("text_encoder", text, on_cpu=m.text_encoders_on_cpu)
        self.offloader.register("vae", self.pipe.vae)
        use_attention(self.pipe.unet, m.attention)
        use_vae_tiling(self.pipe.vae, m.vae_tiling)

    def load_reward(self, dtype: torch.dtype) -> None:
        """The reward, a model's placed where ``memory.offload`` wants it. After
        ``prepare_training``: an fp8 denoiser has left the host's memory by then."""
        cfg = self.config
        self.reward_fn = (
            self.reward
            if self.reward is not None
            else build_reward(cfg.reward.name, cfg.reward, dtype)
        )
        if isinstance(self.reward_fn, ModelReward):  # on the GPU only while scoring
            self.offloader.register("reward", self.reward_fn.module)

    def prepare_training(self) -> None:
        """LoRA (or every weight), checkpointing and the optimiser, handed to accelerate."""
        cfg, m = self.config, self.config.memory
        self.params = make_trainable(
            self.pipe.unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets
        )
        if m.quantize == "fp8":  # after the LoRA: peft builds its adapters from 16-bit layers
            store_weights_in_fp8(self.pipe.unet)
            keep_out_of_ddp_sync(self.pipe.unet)  # equal on every process, as converted
            self.offloader.register("unet", self.pipe.unet, stays=True)
        if self.accelerator.mixed_precision != "no":  # every UNet call is under autocast
            skip_lora_input_casts(self.pipe.unet)
        if cfg.speed.fused_lora:
            fuse_lora_layers(self.pipe.unet)
        if cfg.speed.channels_last:
            convolutions_in_channels_last(self.pipe.unet)
        if cfg.speed.half_norms:  # acts under autocast only: a no-op in full precision
            run_norms_in_half(self.pipe.unet)
        if m.gradient_checkpointing:
            enable_checkpointing(
                self.pipe.unet, checkpoint_function(m.keep_attention), m.uncheckpointed_levels
            )
        # DiffusionNFT samples with a lagging copy of the LoRA weights
        self.sampling_weights = (
            SamplingWeights(self.params) if cfg.train.algorithm == "nft" else None
        )
        self.optimizer_steps_done = 0
        optimizer, self.optimizer_kind = build_optimizer(self.params, cfg.train, m.optimizer)
        # the run's config says what steps (its resume builds the same, whatever is
        # installed by then): 8-bit AdamW falls back to torch's where bitsandbytes is missing
        m.optimizer = self.optimizer_kind
        self.unet, self.optimizer = self.accelerator.prepare(self.pipe.unet, optimizer)
        note = compile_unet(
            self.pipe.unet,
            cfg.speed.compile,
            self.accelerator.device,
            say=self.log,
            scope=cfg.speed.compile_scope,
            channels_last=cfg.speed.channels_last,
        )
        if note:
            self.log(note)
        if cfg.speed.compile_decoder:
            shape = DecodeShape.of_run(
                self.pipe.vae, m.decode_batch, cfg.sample.batch_size, cfg.sample.resolution
            )
            self.log(compile_decoder(self.pipe.vae, self.accelerator.device, shape, self.log))
        # an fp16 gradient scaler overflows until its scale has come down (halved per
        # skipped step, from 2**16): allow it those steps on top
        scaler_allowance = SCALER_HALVINGS if self.accelerator.scaler is not None else 0
        self.guard = DivergenceGuard(cfg.train.max_skipped_steps + scaler_allowance)

    def trained_steps_per_sample(self) -> int:
        """``config.trained_steps_per_sample`` for this run's policy."""
        cfg = self.config
        return trained_steps_per_sample(cfg.sample, cfg.train, self.policy.trainable_steps())

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def replays_graphs(self) -> bool:
        """Whether the training call replays CUDA graphs (``speed.compile``)."""
        return graphs_replay(self.config.speed, "training")

    @property
    def counts_graph_events(self) -> bool:
        """Whether the epochs report CUDA-graph events: graphs replay, and this torch's
        cudagraph trees could be counted (``speed.cuda_graphs.count_graph_events``)."""
        return self.replays_graphs and graph_events_counted()

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    # ------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> list[dict]:
        self.setup()
        cfg = self.config
        self.open_dashboard(first_epoch=(epochs_done(self.run_dir) if resume else 0) + 1)
        start = self.restore() if resume else self.start_fresh()
        self.time_left = TimeLeft(cfg.run.epochs, start, compiles=cfg.speed.compile != "off")
        history = []
        epoch = start
        replay_warned = False
        try:
            for epoch in range(start, cfg.run.epochs):
                metrics = self.run_epoch(epoch)
                if epoch == start and (split := split_graph_note(cfg.speed.compile)):
                    self.log(split)  # the first epoch traced every call the run makes
                if self.checks_time_model(epoch, start):  # and the memory estimate
                    for check in (check_line(cfg, metrics), memory_check_line(cfg, metrics)):
                        if check:
                            self.log(check)
                if note := recorded_again_note(metrics, cfg.speed.compile, epoch == start):
                    self.log(note)
                warning = replay_warning(metrics, cfg)
                if warning and not replay_warned:
                    self.log(warning)  # once: the epoch lines show it from then on
                    replay_warned = True
                self.end_epoch(epoch, metrics)
                history.append(metrics)
            self.finish()
        except torch.OutOfMemoryError:
            raise UserError(self.out_of_memory_message(epoch)) from None
        except NonFiniteTraining as err:
            raise UserError(self.diverged_message(epoch, str(err))) from None
        finally:
            self.dashboard.close()
        return history

    def checks_time_model(self, epoch: int, start: int) -> bool:
        """Whether ``epoch`` is where the run prints its time model and memory checks
        (``memory.check.memory_check_line``): the first epoch
        after the one that warmed up, on one CUDA card (several: no fit to check), in a
        run of the user's model (a benchmark's random-weight pipeline reports its own)."""
        warmed = epoch == start + 1
        alone = self.is_main and world_size() == 1
        return warmed and alone and self.meter.cuda and self.pipeline is None

    def open_dashboard(self, first_epoch: int) -> None:
        """The ``run.log_with`` tracker, on the main process (events after the checkpoint
        being resumed are dropped: those epochs are trained again)."""
        choice, note = resolve_log_with(self.config.run.log_with)
        if not self.is_main:
            return
        if note:
            self.log(note)
        with self.saving("the TensorBoard/wandb logs"):
            self.dashboard = build_tracker(choice, self.run_dir, self.config, first_epoch)

    def run_epoch(self, epoch: int) -> dict:
        epoch_started = time.perf_counter()
        graphs_before = copy.copy(GRAPH_EVENTS)
        phase_seconds_before = self.meter.seconds()
        samples, rewards, seconds = self.sample_and_score(epoch)
        reward_extras = self.reward_extras()
        advantages, gathered_rewards = self.advantages(samples.prompts, rewards, epoch)
        started = time.perf_counter()
        self.phase = "training"
        with self.meter.phase("training"):
            train_metrics = self.train_on(samples, advantages, epoch)
        self.optimizer_steps_done += train_metrics["optimizer_steps"]
        # the epoch's CUDA-graph events, evaluation's one-off shapes left out
        graph_events = graph_events_since(graphs_before) if self.counts_graph_events else {}
        if self.sampling_weights is not None:  # NFT's sampling policy follows the trained one
            self.sampling_weights.follow(old_policy_decay(self.optimizer_steps_done))
        seconds["seconds_training"] = time.perf_counter() - started
        evaluation = self.evaluate(epoch)
        seconds["seconds_epoch"] = time.perf_counter() - epoch_started
        return {
            "epoch": epoch + 1,  # epochs are numbered from 1 wherever a user sees them
            "reward_mean": gathered_rewards.mean().item(),
            "reward_std": gathered_rewards.std(unbiased=False).item(),
            "reward_min": gathered_rewards.min().item(),
            "reward_max": gathered_rewards.max().item(),
            "samples": len(gathered_rewards),
            **train_metrics,
            **seconds,
            **phase_seconds_since(self.meter, phase_seconds_before),
            **self.meter.peaks(),
            **reward_extras,
            **evaluation,
            **graph_events,
        }

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Mean reward on prompts never trained on (``prompts.eval_source``), main process."""
        cfg = self.config
        due = cfg.run.eval_every > 0 and (epoch + 1) % cfg.run.eval_every == 0
        if not (due and self.is_main):
            return {}
        self.phase = "evaluating"
        prompts = load_prompts(cfg.prompts.eval_source)
        images = self.render_to_view(prompts, cfg.run.eval_seeds)
        repeated = [p for p in prompts for _ in cfg.run.eval_seeds]
        rewards = self.score(images.flatten(0, 1), repeated)
        return {
            "eval_reward_mean": rewards.mean().item(),
            **{f"eval_{k}": v for k, v in self.reward_extras().items()},
        }

    def render_to_view(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images [prompts, seeds, ...] drawn by the policy's viewing sampler (grids and
        evaluation). The UNet runs eagerly here under ``speed.compile``: these one-off
        shapes would each compile (minutes with Inductor) and, with CUDA graphs, hold a
        memory pool of their own for the rest of the run."""
        cfg = self.config
        unet = self.accelerator.unwrap_model(self.unet)
        unet.eval()
        with self.accelerator.autocast(), uncompiled_calls(cfg.speed.compile):
            return render(
                self.pipe,
                unet,
                self.policy.for_viewing(),
                prompts,
                seeds,
                self.negative,
                cfg.sample.guidance_scale,
                cfg.sample.resolution,
                offloader=self.offloader,
                cache=self.prompt_cache,
                half_decode=cfg.speed.half_decode,
            )

    def reward_extras(self) -> dict[str, float]:
        """What the reward logs beside itself since the last call (BERTScore precision, F1)."""
        return self.reward_fn.extra_metrics() if isinstance(self.reward_fn, ModelReward) else {}

    def out_of_memory_message(self, epoch: int) -> str:
        """What to change after a CUDA out-of-memory error; the last checkpoint is untouched
        (checkpoints are only written between epochs)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        folder = latest_checkpoint(self.run_dir)
        kept = f"checkpoint {folder.name} is kept" if folder else "no checkpoint was written yet"
        m, t = self.config.memory, self.config.train
        per_step = t.batch_size * t.gradient_accumulation_steps
        smaller = max((d for d in divisors(per_step) if d < t.batch_size), default=0)
        graphs = self.replays_graphs  # their pool goes first
        return (
            f"out of GPU memory while {self.phase} in epoch {epoch + 1} ({kept}). Use less memory "
            f"and continue: `lowvram-ddpo train --resume {self.run_dir} --vram "
            f"{_smaller_budget(self.accelerator.device)}` picks the settings; by hand, add "
            + ("--set speed.compile=off " if graphs else "")
            + (f"--set train.batch_size={smaller} " if smaller else "")
            + ("" if m.gradient_checkpointing else "--set memory.gradient_checkpointing=true ")
            + ("--set memory.uncheckpointed_levels=0 " if m.uncheckpointed_levels else "")
            + ("--set memory.keep_attention=false " if m.keep_attention else "")
            + ("" if m.offload else "--set memory.offload=true ")
            + "(`lowvram-ddpo bench memory` predicts the peak of each setting)"
        )

    def diverged_message(self, epoch: int, what: str) -> str:
        """Why the run stopped on NaN/inf, what to change, and what is kept (nothing
        non-finite is ever saved: the last checkpoint is from before it went wrong)."""
        lr = self.config.train.learning_rate
        folder = latest_checkpoint(self.run_dir)
        kept = (
            f"the last good checkpoint is {folder} (also exported to {self.run_dir})"
            if folder
            else "no checkpoint was written yet"
        )
        return (
            f"training diverged in epoch {epoch + 1}: {what}. The likely cause is a learning rate "
            f"too high for this run (train.learning_rate={lr:g}): start again with a lower "
            f"--lr, e.g. {lr / 10:g}. Nothing non-finite was saved; {kept}"
        )

    @contextmanager
    def saving(self, what: str) -> Iterator[None]:
        """A failed write (disk full, folder gone or read-only) becomes one line; what was
        saved before stays valid (checkpoints and latest.json are replaced atomically)."""
        try:
            yield
        except OSError as err:
            folder = latest_checkpoint(self.run_dir)
            kept = f"checkpoint {folder} is kept" if folder else "no checkpoint was written yet"
            raise UserError(
                f"could not save {what} in {self.run_dir} ({err.strerror or err}); {kept}. "
                f"Free some space (or fix the folder) and continue with "
                f"`lowvram-ddpo train --resume {self.run_dir}`"
            ) from None

    def start_fresh(self) -> int:
        if self.is_main:
            with self.saving("the run's config"):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.save_config()
                (self.run_dir / "metrics.jsonl").write_text("")
            if self.config.run.grid_every >= 0:
                with self.saving("the first grid"):
                    self.save_grid(0)
        self.accelerator.wait_for_everyone()
        return 0

    def save_config(self) -> None:
        """The resolved config, which ``--resume`` reads."""
        write_text_atomic(self.run_dir / "config.toml", dump_toml(self.config))

    def restore(self) -> int:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            self.log(f"no checkpoint in {self.run_dir} yet: starting from epoch 1")
            return self.start_fresh()
        if self.is_main:  # a run killed before it copied them left last epoch's
            with self.saving("the run folder's LoRA files"):
                refresh_exports(self.run_dir, folder, only_stale=True)
        state = load_checkpoint(
            folder, self.accelerator.unwrap_model(self.unet), self.optimizer, self.optimizer_kind
        )
        check_epochs_left(self.run_dir, state.epochs_done, self.config.run.epochs)
        self.tracker.load_state_dict(state.stat_tracker)
        self.optimizer_steps_done = state.optimizer_steps
        if self.accelerator.scaler is not None and state.grad_scaler:
            self.accelerator.scaler.load_state_dict(state.grad_scaler)
        if self.sampling_weights is not None:
            if not state.algorithm:
                raise UserError(f"{folder} has no DiffusionNFT sampling weights: not an nft run")
            self.sampling_weights.load(state.algorithm)
        restore_rng_states(state.rng)
        if self.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", state.epochs_done)
            # what a resume changed (memory levers, micro-batch, epochs) holds for the next
            # resume too: a run that ran out of memory must not get its old settings back
            with self.saving("the run's config"):
                self.save_config()
        self.log(
            f"resumed {self.run_dir} after epoch {state.epochs_done} of {self.config.run.epochs}"
            f" ({folder.name}): next is epoch {state.epochs_done + 1}"
        )
        self.accelerator.wait_for_everyone()
        return state.epochs_done

    # ------------------------------------------------------------ phases

    def sample_and_score(self, epoch: int) -> tuple[Trajectories, torch.Tensor, dict]:
        """Roll out this epoch's batches; each batch is scored while the next one samples
        (``reward.overlap``), then its pixels are dropped: only latents and log-probs are
        kept for training."""
        cfg, acc = self.config, self.accelerator
        generator = epoch_generator(cfg.run.seed, epoch, acc.process_index, SAMPLING_STREAM)
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        batches, pending = [], []
        seconds = {"seconds_sampling": 0.0, "seconds_reward": 0.0}
        bar = tqdm(
            range(cfg.sample.batches_per_epoch),
            desc=f"epoch {epoch + 1} sampling",
            leave=False,
            disable=not (cfg.run.progress and self.is_main),
        )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as scorer:
            grouped = None
            for k in bar:
                self.phase = "sampling"
                started = time.perf_counter()
                if cfg.sample.group_size == 1:  # DDPO: every image its own prompt
                    picks = torch.randint(
                        len(self.prompts), (cfg.sample.batch_size,), generator=generator
                    )
                else:  # GRPO: the epoch's groups, drawn once, then cut into batches
                    grouped = grouped if grouped is not None else self.group_picks(generator)
                    picks = grouped[k * cfg.sample.batch_size : (k + 1) * cfg.sample.batch_size]
                prompts = [self.prompts[i] for i in picks]
                with (
                    acc.autocast(),
                    self.sampling_policy(),
                    sampling_calls(cfg.speed),
                    self.narrowed_decode_kept(),
                ):
                    batch = sample_trajectories(
                        self.pipe,
                        unet,
                        self.policy,
                        prompts,
                        self.negative,
                        cfg.sample.guidance_scale,
                        cfg.sample.resolution,
                        generator,
                        offloader=self.offloader,
                        cache=self.prompt_cache,
                        decode_batch=self.decode_width,
                        meter=self.meter,  # its phases: sampling, then decode
                        half_decode=cfg.speed.half_decode,
                    )
                seconds["seconds_sampling"] += time.perf_counter() - started
                images, batch.images = batch.images, None
                batches.append(batch)
                if self.overlap_rewards:
                    pending.append(scorer.submit(self.timed_score, images, prompts, seconds))
                else:
                    self.phase = "scoring rewards"
                    with self.meter.phase("reward"):
                        pending.append(_done(self.timed_score(images, prompts, seconds)))
            self.phase = "scoring rewards"
            rewards = [future.result() for future in pending]
        self.agree_on_narrowing()
        return Trajectories.cat(batches), torch.cat(rewards), seconds

    @contextmanager
    def narrowed_decode_kept(self) -> Iterator[None]:
        """Around a sampling batch: a decode that ran out of memory and went on narrower
        (or tiled) is logged and kept in the run's config, also when a later error in
        the batch ends the run, so that a resumed run starts there."""
        try:
            yield
        finally:
            self.keep_narrowing("decode", self.decode_width.take_notes())

    def keep_narrowing(self, phase: str, notes: list[str]) -> None:
        """Log ``notes`` (a narrowing's, in ``phase``: decode or reward) and write the
        narrowed widths, and the decode's tiling, into the run's config (the main
        process), so that a resumed run starts there."""
        if not notes:
            return
        with self.narrowing:
            self.write_narrowing(phase, notes)

    def write_narrowing(self, phase: str, notes: list[str]) -> None:
        m = self.config.memory
        m.decode_batch = self.decode_width.width
        m.vae_tiling = m.vae_tiling or tiles_as_configured(self.pipe.vae)
        if (scoring := self.scoring_width()) is not None:
            self.config.reward.batch_size = scoring.width
        for note in notes:
            self.log(f"{phase}: {note}")
        if self.is_main:
            with self.saving("the run's config"):
                self.save_config()

    def agree_on_narrowing(self) -> None:
        """Several processes: each narrows its decode (and a reward model its scoring)
        alone, mid-epoch; at the epoch's end all take the narrowest widths and the tiling
        any of them reached (one collective), so that their configs agree and the main
        process logs and saves what another met."""
        if self.accelerator.num_processes == 1:
            return
        vae, scoring = self.pipe.vae, self.scoring_width()
        mine = [self.decode_width.width, int(tiles_as_configured(vae))]
        mine.append(scoring.width if scoring is not None else 0)
        every = self.accelerator.gather(torch.tensor([mine], device=self.accelerator.device))
        elsewhere = "out of GPU memory in another process:"
        notes = []
        if (narrowest := int(every[:, 0].min())) < self.decode_width.width:
            self.decode_width.width = narrowest
            notes.append(f"{elsewhere} {narrowest} at a time from now on")
        if bool(every[:, 1].max()) and not tiles_as_configured(vae):
            use_vae_tiling(vae, True)
            notes.append(f"{elsewhere} decoding in tiles from now on")
        self.keep_narrowing("decode", notes)
        if scoring is not None and (narrowest := int(every[:, 2].min())) < scoring.width:
            scoring.width = narrowest
            self.keep_narrowing("reward", [f"{elsewhere} {narrowest} at a time from now on"])

    def scoring_width(self) -> NarrowingWidth | None:
        """A reward model's scoring width (None for rewards without a network)."""
        return self.reward_fn.scoring_width() if isinstance(self.reward_fn, ModelReward) else None

    def sampling_policy(self) -> AbstractContextManager:
        """The weights that sample: the trained ones, or NFT's lagging copy."""
        return nullcontext() if self.sampling_weights is None else self.sampling_weights.in_use()

    def group_picks(self, generator: torch.Generator) -> torch.Tensor:
        """The prompt index of each of the epoch's images, group_size images per prompt;
        distinct prompts for the groups while there are enough (as Flow-GRPO's sampler)."""
        s = self.config.sample
        groups = s.batch_size * s.batches_per_epoch // s.group_size
        if groups <= len(self.prompts):
            prompts = torch.randperm(len(self.prompts), generator=generator)[:groups]
        else:
            prompts = torch.randint(len(self.prompts), (groups,), generator=generator)
        return prompts.repeat_interleave(s.group_size)

    @property
    def overlap_rewards(self) -> bool:
        """Score in a worker thread while the next batch samples. ``auto``: for CPU rewards
        (JPEG) while sampling runs on a GPU. Not for reward models, which would share the
        GPU with sampling, and not when sampling itself runs on the CPU: there the two
        compete for the same cores (measured: sampling ~1.8x slower on 2 cores)."""
        choice = self.config.reward.overlap
        if choice == "auto":
            on_gpu = self.accelerator.device.type != "cpu"
            return on_gpu and not isinstance(self.reward_fn, ModelReward)
        return choice == "on"

    def timed_score(self, images: torch.Tensor, prompts: list[str], seconds: dict) -> torch.Tensor:
        started = time.perf_counter()
        rewards = self.score(images, prompts)
        seconds["seconds_reward"] += time.perf_counter() - started
        return rewards

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if (width := self.scoring_width()) is not None:
            try:
                with self.offloader.loaded("reward"), self.accelerator.autocast():
                    rewards = self.reward_fn(images, prompts)
            finally:  # a narrowed scoring batch is kept, also when an error follows
                self.keep_narrowing("reward", width.take_notes())
        else:
            rewards = self.reward_fn(images, prompts)
        return check_rewards(rewards, len(prompts), self.config.reward.name)

    def advantages(
        self, prompts: list[str], rewards: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather every process's rewards, normalise them identically everywhere, keep ours.

        Returns (this process's per-sample training signal, all gathered rewards). The
        signal is the clipped advantage for DDPO and the sample weight for (sparse) RWR.
        """
        acc, t = self.accelerator, self.config.train
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        all_prompts = gather_object(list(prompts)) if acc.num_processes > 1 else list(prompts)
        if t.algorithm == "grpo" or (t.algorithm == "nft" and self.config.sample.group_size > 1):
            normalised = group_advantages(all_prompts, all_rewards, self.config.stats.global_std)
        else:
            normalised = self.tracker.update(all_prompts, all_rewards)
        advantages = clip_advantages(normalised, t.adv_clip_max)
        if t.algorithm == "nft":
            signal = optimality(advantages, t.adv_clip_max)
        elif t.algorithm == "rwr":
            signal = rwr_weights(advantages, t.rwr_beta)
        elif t.algorithm == "sparse-rwr":
            signal = sparse_rwr_weights(advantages, t.sparse_rwr_percentile)
        else:
            signal = advantages
        n = len(prompts)
        local = signal[acc.process_index * n : (acc.process_index + 1) * n]
        if self.config.run.log_rollouts:
            self.write_rollout_log(epoch + 1, f"rank{acc.process_index}", prompts, rewards, local)
            if self.is_main:
                self.write_rollout_log(epoch + 1, "gathered", all_prompts, all_rewards, signal)
        return local, all_rewards

    def train_on(self, samples: Trajectories, signal: torch.Tensor, epoch: int) -> dict:
        """Inner epochs over the stored samples, one timestep's forward/backward at a time."""
        cfg, acc = self.config, self.accelerator
        generator = epoch_generator(cfg.run.seed, epoch, acc.process_index, TRAINING_STREAM)
        n = len(samples)
        k = self.trained_steps_per_sample()
        self.unet.train()
        totals = TrainingTotals()
        micro_batches = range(0, n, cfg.train.batch_size)
        bar = tqdm(
            total=cfg.train.inner_epochs * len(micro_batches) * k,
            desc=f"epoch {epoch + 1} training",
            leave=False,
            disable=not (cfg.run.progress and self.is_main),
        )
        for _ in range(cfg.train.inner_epochs):
            order = torch.randperm(n, generator=generator)
            for start in micro_batches:
                indices = order[start : start + cfg.train.batch_size]
                steps = self.steps_to_train(samples, indices, generator)
                # the micro-batch's trajectories go to the device in one copy; its k
                # micro-steps then index them there, without waiting on the host
                chunk = samples.select(indices).to(acc.device)
                chunk_signal = to_device(signal[indices], acc.device)
                chunk_steps = to_device(steps, acc.device)
                rows = torch.arange(len(indices), device=acc.device)
                for j in range(k):
                    batch = MicroBatch(samples=rows, steps=chunk_steps[:, j])
                    with acc.accumulate(self.unet):
                        with acc.autocast():
                            loss, metrics = self.micro_step_loss(
                                chunk, batch, chunk_signal, generator
                            )
                        acc.backward(loss)
                        totals.add_micro_step(loss, metrics)
                        if acc.sync_gradients:
                            totals.add_optimizer_step(self.optimizer_step())
                    bar.update()
        bar.close()
        return {**totals.means(), "skipped_steps": self.guard.take_skipped_count()}

    def steps_to_train(
        self, samples: Trajectories, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """[b, k] each sample's own random subset, in random order, of the steps it may train
        on: every step, or (policy gradients) the window that sampled (Flow-GRPO-Fast)."""
        k = self.trained_steps_per_sample()
        # NFT re-noises the final image at any step's noise level: the sampler's window
        # (or CPS's deterministic last step) does not limit it
        if samples.action_steps is None or self.config.train.algorithm == "nft":
            count = samples.log_probs.shape[1]
            if self.config.train.algorithm in POLICY_GRADIENT:
                count = min(count, self.policy.trainable_steps())
            return torch.stack([torch.randperm(count, generator=generator)[:k] for _ in indices])
        window = samples.action_steps[indices]
        # steps that sampled but are too sharp to train (CPS's next-to-last) end a window
        trainable = int((window < self.policy.trainable_steps()).sum(dim=1).min())
        window = window[:, :trainable]
        picks = [torch.randperm(window.shape[1], generator=generator)[:k] for _ in indices]
        return torch.stack([row[pick] for row, pick in zip(window, picks, strict=True)])

    def optimizer_step(self) -> float:
        """Clip the accumulated gradients and step, unless they are not finite
        (``DivergenceGuard``: the step is skipped and counted). Returns the gradient norm."""
        acc = self.accelerator
        norm = float(acc.clip_grad_norm_(self.params, self.config.train.max_grad_norm))
        # an fp16 gradient scaler skips a non-finite step itself, and must be called to see
        # it and lower its scale
        if self.guard.allows_step(norm) or acc.scaler is not None:
            self.optimizer.step()
            self.guard.check_weights(self.params)
        self.optimizer.zero_grad()
        return norm

    def micro_step_loss(
        self,
        samples: Trajectories,
        batch: MicroBatch,
        signal: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        if cfg.train.algorithm in POLICY_GRADIENT:
            return policy_gradient_loss(
                cfg.train.algorithm,
                self.unet,
                self.policy,
                samples,
                batch,
                signal,
                self.negative,
                cfg.sample.guidance_scale,
                cfg.train.clip_range,
                cfg.train.kl_coef,
            )
        if cfg.train.algorithm == "nft":
            assert self.sampling_weights is not None and isinstance(self.policy, FlowSDEPolicy)
            return nft_loss(
                self.unet,
                self.policy,
                samples,
                batch,
                signal,
                generator,
                self.sampling_weights,
                cfg.train.nft_beta,
                cfg.train.adv_clip_max,
                cfg.train.kl_coef,
            )
        return reward_weighted_loss(
            self.unet, self.policy.scheduler, samples, batch, signal, generator
        )

    # ------------------------------------------------------------ outputs

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        cfg, acc = self.config, self.accelerator
        done = epoch + 1
        if self.is_main:
            self.log(self.epoch_line(metrics, self.time_left.after(done)))
            metrics_file = self.run_dir / "metrics.jsonl"
            with self.saving(f"the metrics of epoch {done}"):
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                chart = self.run_dir / METRICS_CHART
                write_metrics_chart(read_metrics(metrics_file), chart, cfg.reward.name)
            self.dashboard.log_metrics(metrics, done)
            mark_compiled(cfg)  # a later short run finds these kernels (compile_payoff)
            if done % cfg.run.checkpoint_every == 0 or done == cfg.run.epochs:
                self.write_checkpoint(done)
            if cfg.run.grid_every > 0 and done % cfg.run.grid_every == 0 and done < cfg.run.epochs:
                with self.saving(f"the grid of epoch {done}"):
                    self.save_grid(done)
        acc.wait_for_everyone()

    def write_checkpoint(self, done: int) -> None:
        with self.saving(f"the checkpoint of epoch {done}"):
            save_checkpoint(
                self.run_dir,
                self.accelerator.unwrap_model(self.unet),
                self.optimizer,
                done,
                self.tracker.state_dict(),
                self.config.run.keep_checkpoints,
                algorithm=self.sampling_weights.state() if self.sampling_weights else None,
                optimizer_steps=self.optimizer_steps_done,
                optimizer_kind=self.optimizer_kind,
                grad_scaler=scaler.state_dict() if (scaler := self.accelerator.scaler) else None,
            )

    def epoch_line(self, metrics: dict, time_left: str = "") -> str:
        line = (
            f"epoch {metrics['epoch']}/{self.config.run.epochs}: reward "
            f"{metrics['reward_mean']:.4g} ± {metrics['reward_std']:.3g}"
            f"  loss {format_metric(metrics['loss'], '.3g')}"
            f"  kl {format_metric(metrics['approx_kl'], '.2e')}"
            f"  clipfrac {format_metric(metrics['clipfrac'], '.3f')}"
            f"{replay_miss(metrics, self.config.train.clip_range)}  time sample/reward/train "
            f"{metrics['seconds_sampling']:.1f}/{metrics['seconds_reward']:.1f}/"
            f"{metrics['seconds_training']:.1f}s"
        )
        if metrics.get("kl_to_base") is not None:
            line += f"  kl to base {metrics['kl_to_base']:.2e}"
        line += graph_events_piece(metrics)
        line += peak_piece(metrics)  # CUDA only: the meter's peaks are in the metrics
        if metrics["skipped_steps"]:
            line += f"  skipped {metrics['skipped_steps']} steps (NaN/inf gradients)"
        return line + (f"  {time_left}" if time_left else "")

    def finish(self) -> None:
        cfg = self.config
        if self.is_main and cfg.run.epochs > 0 and cfg.run.grid_every >= 0:
            with self.saving("the before/after grid"):
                self.save_grid(cfg.run.epochs, before_after=True)
        self.accelerator.wait_for_everyone()

    def save_grid(self, epochs_trained: int, before_after: bool = False) -> Path:
        """Render the fixed prompts x seeds, each image scored (``grids/epoch-NNNN.png``);
        with ``before_after`` the base model beside it (``grids/before_after.png``)."""
        cfg = self.config
        self.phase = "rendering the grid"
        unet = self.accelerator.unwrap_model(self.unet)
        panels, scores = {}, {}

        def add_panel(title: str) -> None:
            images = self.render_to_view(cfg.run.grid_prompts, cfg.run.grid_seeds)
            prompts = [p for p in cfg.run.grid_prompts for _ in cfg.run.grid_seeds]
            panels[title] = images
            scores[title] = self.score(images.flatten(0, 1), prompts).view(images.shape[:2])

        if before_after and has_lora(unet):  # full fine-tuning: epoch-0000.png is the "before"
            unet.disable_adapters()
            add_panel("base model")
            unet.enable_adapters()
        add_panel(grid_title(epochs_trained, with_lora=before_after and has_lora(unet)))
        self.reward_extras()  # the grid's scores are not the next epoch's samples'
        folder = self.run_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        name = "before_after.png" if before_after else f"epoch-{epochs_trained:04d}.png"
        make_grid(panels, cfg.run.grid_prompts, cfg.run.grid_seeds, scores).save(folder / name)
        tag = "grids/before_after" if before_after else "grids/progress"
        self.dashboard.log_image(tag, folder / name, epochs_trained)
        return folder / name

    def write_rollout_log(
        self,
        epoch: int,
        part: str,
        prompts: list[str],
        rewards: torch.Tensor,
        signal: torch.Tensor,
    ) -> None:
        """rollouts/epoch-NNNN-<part>.json (NNNN from 1): prompts, rewards and the training signal
        (advantage or RWR weight), per process (rankN) and gathered."""
        folder = self.run_dir / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "epoch": epoch,
            "prompts": list(prompts),
            "rewards": rewards.tolist(),
            "signal": signal.tolist(),
        }
        (folder / f"epoch-{epoch:04d}-{part}.json").write_text(json.dumps(record))


def grid_title(epochs_trained: int, with_lora: bool) -> str:
    """A grid panel's title: what model drew it."""
    if epochs_trained == 0:
        return "base model (before training)"
    epochs = f"{epochs_trained} epoch{'s' * (epochs_trained != 1)}"
    return f"with the LoRA, after {epochs}" if with_lora else f"after {epochs}"


def _done(value: torch.Tensor) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _smaller_budget(device: torch.device) -> str:
    """A ``--vram`` a GiB below the card's size: a run fitted to the card that still ran out
    of memory gets smaller settings from it, where the card's size would give the same."""
    if device.type != "cuda":
        return "<a size below your card's, e.g. 7GB>"
    total = torch.cuda.get_device_properties(device).total_memory
    return f"{max(1, round(total / GB) - 1)}GB"


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs a killed run logged but did not checkpoint."""
    if not path.is_file():
        return
    records = [(line, decoded(line)) for line in path.read_text().splitlines()]
    # a line cut short (the disk filled as it was written) is dropped with the epochs after
    kept = [line for line, record in records if record and record["epoch"] <= epochs_done]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def train(config: Config, run_dir: Path, resume: bool = False) -> list[dict]:
    """Train a LoRA with the config's algorithm; returns this run's per-epoch metrics."""
    return Trainer(config, run_dir).fit(resume=resume)
