"""Sampler steps as Gaussian policies: one file per sampler, chosen by ``build_policy``."""

from lowvram_ddpo import flux2
from lowvram_ddpo.config import SAMPLERS
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy.base import Conditioning, GaussianStep, PolicyStep, gaussian_log_prob
from lowvram_ddpo.policy.ddim import DDIMPolicy, guided_model_output
from lowvram_ddpo.policy.flow_cps import FlowCPSPolicy
from lowvram_ddpo.policy.flow_sde import DEFAULT_NOISE_LEVEL, FlowSDEPolicy, is_flow_matching
from lowvram_ddpo.policy.lcm import LCMPolicy


def sampler_for(requested: str, scheduler_config: dict, unet_config: dict) -> str:
    """``auto``: Flow-GRPO's SDE for flow-matching models (SD 3.x, FLUX.2), the LCM policy for
    latent consistency models (an LCMScheduler or a UNet with a guidance embedding), DDIM
    for everything else."""
    if requested != "auto":
        return requested
    if is_flow_matching(scheduler_config):
        return "flow-sde"
    is_lcm = scheduler_config.get("_class_name") == "LCMScheduler"
    return "lcm" if is_lcm or unet_config.get("time_cond_proj_dim") else "ddim"


def build_policy(
    sampler: str,
    scheduler_config: dict,
    unet_config: dict,
    num_steps: int,
    eta: float,
    noise_level: float = DEFAULT_NOISE_LEVEL,
    sde_window: int = 0,
    image_tokens: int = 0,
) -> PolicyStep:
    """The sampler step ``sampler`` (or ``auto``'s choice) over ``num_steps`` steps;
    ``image_tokens``: the latent image's token count (FLUX.2's schedule depends on it)."""
    kind = sampler_for(sampler, scheduler_config, unet_config)
    flow = is_flow_matching(scheduler_config)
    flow_kind = kind in ("flow-sde", "flow-cps")
    if kind in ("ddim", "lcm", "flow-sde", "flow-cps") and flow_kind != flow:
        model = "a flow-matching model (SD 3, FLUX.2)" if flow else "a diffusion (DDPM) model"
        raise UserError(
            f"sample.sampler={sampler} does not fit {model}: use auto (it picks "
            f"{'flow-sde' if flow else 'ddim or lcm'})"
        )
    dynamic = scheduler_config.get("use_dynamic_shifting")
    if flow and dynamic and not flux2.is_flux2_config(unet_config):
        raise UserError(
            "this model's scheduler shifts its timesteps by the image size "
            "(use_dynamic_shifting): supported for FLUX.2-klein only; SD 3.x uses a fixed shift"
        )
    if kind == "lcm":
        return LCMPolicy(scheduler_config, num_steps)
    if kind == "ddim":
        return DDIMPolicy(scheduler_config, num_steps, eta)
    if flow_kind:
        policy = FlowCPSPolicy if kind == "flow-cps" else FlowSDEPolicy
        return policy(
            scheduler_config, num_steps, noise_level, sde_window, image_tokens=image_tokens
        )
    raise UserError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")


__all__ = [
    "DEFAULT_NOISE_LEVEL",
    "SAMPLERS",
    "Conditioning",
    "DDIMPolicy",
    "FlowCPSPolicy",
    "FlowSDEPolicy",
    "GaussianStep",
    "LCMPolicy",
    "PolicyStep",
    "build_policy",
    "gaussian_log_prob",
    "guided_model_output",
    "sampler_for",
]
