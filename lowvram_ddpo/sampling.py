"""Before/after grids for the ``sample`` command: the base model, then the same seeds with
a trained LoRA, through the same DDIM policy the trainer samples with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline, UNet2DConditionModel
from PIL import Image

from lowvram_ddpo import flux2
from lowvram_ddpo.checkpoint import FULL_UNET_DIR, LATEST_FILE, epochs_done
from lowvram_ddpo.config import ModelConfig, SampleConfig, load_config_file
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.grid import make_grid
from lowvram_ddpo.lora_export import LORA_WEIGHTS_NAME
from lowvram_ddpo.memory.fp8_weights import store_weights_in_fp8
from lowvram_ddpo.models import (
    DTYPES,
    load_pipeline,
    pipeline_class,
    resolve_model_name,
    show_loading_bars,
    use_vae_tiling,
)
from lowvram_ddpo.offload import Offloader
from lowvram_ddpo.policy import DEFAULT_NOISE_LEVEL, build_policy, sampler_for
from lowvram_ddpo.preflight import native_resolution_of, saved_model_index
from lowvram_ddpo.rewards import ModelReward, build_reward, check_reward_names, check_rewards
from lowvram_ddpo.rollout import decode_width, image_tokens, render
from lowvram_ddpo.text_encoding import PromptCache, encode_negative, text_encoders

DEFAULT_MODEL = ModelConfig().name
BASE_PANEL = "base model"
LCM_DEFAULT_STEPS = 4
"""Steps for a latent consistency model sampled without a run's settings."""


@dataclass
class SampleRequest:
    prompts: list[str]
    seeds: list[int]
    lora: str = ""
    model: str = ""
    steps: int | None = None
    """None: the run's (or 50)."""
    guidance_scale: float | None = None
    """None: the run's (or 5.0)."""
    eta: float | None = None
    """DDIM's eta; None: the run's (``sample.eta``), else 1.0."""
    resolution: int | None = None
    """None: the run's, else the model's own size."""
    reward: str = ""
    progress: bool = True
    """Progress bars, the model loading's included."""
    fp8: bool | None = None
    """The denoiser's frozen weights in fp8 (``memory/fp8_weights.py``): half its memory
    (FLUX.2-klein: 7.4 -> 3.8 GB of weights, estimated). None: as the run trained (fp8
    for a run on any quantised base, the closest to it that needs no bitsandbytes), else
    16 bits."""


@dataclass
class SampleResult:
    image: Image.Image
    prompts: list[str]
    seeds: list[int]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    panels: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each panel's images, [prompts, seeds, 3, H, W] in [0, 1]."""
    fp8: bool = False
    """Rendered with the denoiser's weights in fp8."""
    notes: list[str] = field(default_factory=list)
    """What rendering had to change (a decode that ran out of GPU memory went tiled)."""

    def report_lines(self) -> list[str]:
        lines = ["the denoiser's frozen weights in fp8 (--no-fp8: 16 bits)"] if self.fp8 else []
        lines += self.notes
        for panel, values in self.scores.items():
            for p, prompt in enumerate(self.prompts):
                cells = "  ".join(
                    f"seed {s}: {values[p, i].item():.4g}" for i, s in enumerate(self.seeds)
                )
                lines.append(f"[{panel}] {prompt}: {cells}")
            lines.append(f"[{panel}] mean reward {values.mean().item():.4g}")
        return lines


def _lora_location(lora: str) -> tuple[Path, str]:
    """(folder, weight file name) that ``load_lora_weights`` takes; for a fully fine-tuned
    run, (its ``unet`` folder, "")."""
    path = Path(lora).expanduser()
    if path.is_file():
        return path.parent, path.name
    if (path / LORA_WEIGHTS_NAME).is_file():
        return path, LORA_WEIGHTS_NAME
    if (path / FULL_UNET_DIR / "config.json").is_file():
        return path / FULL_UNET_DIR, ""
    raise UserError(
        f"no LoRA at '{lora}': give a run folder, a checkpoint folder or a .safetensors file "
        f"(looked for {path / LORA_WEIGHTS_NAME} and {path / FULL_UNET_DIR})"
    )


def _describe(lora: str) -> str:
    """A LoRA's name for a panel title: ``myrun (epoch 30)``, ``myrun (epoch-0010)`` for a
    checkpoint folder, or the file's name."""
    path = Path(lora).expanduser().resolve()
    if path.is_file():
        return path.name
    if (path / LATEST_FILE).is_file():
        return f"{path.name} (epoch {epochs_done(path)})"
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name} ({path.name})"
    return path.name


def _run_config_for(lora: str):  # noqa: ANN202
    """The training config of the run a LoRA came from, when it can be found."""
    if not lora:
        return None
    path = Path(lora).expanduser()
    for folder in (path, *path.parents[:3]):
        if (folder / "config.toml").is_file():
            return load_config_file(folder / "config.toml")
    return None


def run_quantised(run) -> bool:  # noqa: ANN001  (a Config or None)
    """Whether the run trained on a quantised base (fp8, int8 or nf4)."""
    return run is not None and run.memory.quantize != "none"


def _gpu_dtype(model: str, run) -> torch.dtype:  # noqa: ANN001  (a Config or None)
    """bf16 for a bf16 run and for FLUX.2 (a bf16 model whose fp16 activations overflow),
    fp16 otherwise."""
    if run is not None and run.model.mixed_precision == "bf16":
        return DTYPES["bf16"]
    is_flux2 = pipeline_class(resolve_model_name(model)) is Flux2KleinPipeline
    return DTYPES["bf16" if is_flux2 else "fp16"]


def render_comparison(request: SampleRequest) -> SampleResult:
    location = _lora_location(request.lora) if request.lora else None  # first: a typo'd path
    run = _run_config_for(request.lora)
    defaulted = []
    if not request.prompts and run is not None:  # the run's grid prompts, as its grids had
        request = replace(request, prompts=list(run.run.grid_prompts))
        defaulted = [f"prompts: the run's grid prompts ({'; '.join(request.prompts)})"]
    if not request.prompts:
        raise UserError(
            "give prompts with --prompts (repeatable) or --prompt-set, or --lora a run "
            "folder: its grid prompts are the default"
        )
    model = request.model or (run.model.name if run else DEFAULT_MODEL)
    defaults = run.sample if run else SampleConfig()  # the run's settings, else SD 1.5's
    guidance = defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    resolution = request.resolution or (run.sample.resolution if run else None)
    negative_prompt = defaults.negative_prompt
    if request.steps is not None and request.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {request.steps})")
    if request.eta is not None and request.eta <= 0:  # before minutes of model loading
        raise UserError(f"--eta must be above 0 (got {request.eta}): DDIM samples with it")
    if resolution is not None and resolution % 8 != 0:
        raise UserError(f"--resolution must be a multiple of 8 (got {resolution})")
    # before minutes of model loading: what the names and the model's index can tell
    if request.reward:
        check_reward_names([request.reward])
    index = saved_model_index(model)
    if index is not None:
        flux2.check_index_guidance(index, guidance)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = _gpu_dtype(model, run) if on_gpu else DTYPES["no"]
    lcm_lora = run.model.lcm_lora if run and not request.model else ""
    show_loading_bars(request.progress)
    use_t5 = run.model.use_t5 if run else True
    pipe = load_pipeline(model, dtype, lcm_lora=lcm_lora, use_t5=use_t5)
    # a run's own tiling (what its rewards saw); else tiles only where a decode runs out
    use_vae_tiling(pipe.vae, bool(run and run.memory.vae_tiling))
    decoding = decode_width(1)
    fp8 = request.fp8 if request.fp8 is not None else run_quantised(run)
    if fp8:  # on the host, before the denoiser goes to the card
        store_weights_in_fp8(pipe.unet.requires_grad_(False))
    # as in training: only the denoiser stays on the card; the text encoders (T5, Qwen3:
    # 8-10 GB) and the VAE visit it for their own work
    offloader = Offloader(device, enabled=on_gpu)
    offloader.register("unet", pipe.unet, stays=True)
    for name, module in (("text_encoder", text_encoders(pipe)), ("vae", pipe.vae)):
        module.requires_grad_(False)  # frozen: each visit copies the weights in only
        offloader.register(name, module)
    # like diffusers: without a run or a flag, the size the model was trained at
    resolution = resolution or native_resolution_of(pipe)
    kind = sampler_for(defaults.sampler, pipe.scheduler.config, pipe.unet.config)
    fallback = LCM_DEFAULT_STEPS if kind == "lcm" and not run else defaults.num_steps
    steps = fallback if request.steps is None else request.steps
    noise_level = run.sample.noise_level if run else DEFAULT_NOISE_LEVEL
    tokens = image_tokens(pipe.unet, pipe.vae, resolution)
    policy = build_policy(
        kind,
        pipe.scheduler.config,
        pipe.unet.config,
        steps,
        defaults.eta if request.eta is None else request.eta,
        noise_level,
        image_tokens=tokens,
    ).for_viewing()  # flow models: the ODE, as their own pipelines sample
    flux2.check_guidance(pipe, guidance)
    with offloader.loaded("text_encoder"):
        negative = encode_negative(pipe, negative_prompt).to(device)
    cache = PromptCache()  # each prompt encoded once for every seed and panel

    def images() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return render(
                pipe,
                pipe.unet,
                policy,
                request.prompts,
                request.seeds,
                negative,
                guidance,
                resolution,
                progress=request.progress,
                cache=cache,
                offloader=offloader,
                decode=decoding,
            )

    panels = {BASE_PANEL: images()}
    if location is not None:
        folder, weight_name = location
        if weight_name:
            pipe.load_lora_weights(str(folder), weight_name=weight_name)
            panels[f"with LoRA {_describe(request.lora)}"] = images()
        else:
            pipe.unet.to("cpu")  # the base's card memory, for the fine-tuned one
            pipe.unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
            if fp8:
                store_weights_in_fp8(pipe.unet.requires_grad_(False))
            offloader.register("unet", pipe.unet, stays=True)
            panels[f"fine-tuned {_describe(request.lora)}"] = images()
    scores = {}
    if request.reward:
        reward = build_reward(request.reward, run.reward if run else None, dtype)
        if isinstance(reward, ModelReward):
            reward.module.to(device)
        for name, panel in panels.items():
            flat = panel.flatten(0, 1)
            prompts = [p for p in request.prompts for _ in request.seeds]
            values = check_rewards(reward(flat, prompts), len(flat), request.reward)
            scores[name] = values.view(len(request.prompts), len(request.seeds))
    image = make_grid(panels, request.prompts, request.seeds, scores or None)
    notes = defaulted + [f"decode: {note}" for note in decoding.take_notes()]
    if request.reward and isinstance(reward, ModelReward):
        notes += [f"reward: {note}" for note in reward.scoring_width().take_notes()]
    return SampleResult(image, request.prompts, request.seeds, scores, panels, fp8, notes)
