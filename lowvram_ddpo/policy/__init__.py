"""Sampler steps as Gaussian policies: one file per sampler."""

from lowvram_ddpo.policy.base import Conditioning, GaussianStep, PolicyStep, gaussian_log_prob
from lowvram_ddpo.policy.ddim import DDIMPolicy, guided_model_output

__all__ = [
    "Conditioning",
    "DDIMPolicy",
    "GaussianStep",
    "PolicyStep",
    "gaussian_log_prob",
    "guided_model_output",
]
