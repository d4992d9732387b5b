"""Prompt-image alignment (the DDPO paper's fourth task): a vision-language model answers
a question about the image, and the reward is the BERTScore recall of its answer
against a reference sentence made from the prompt ("The image contains a cat riding a
bike"). Precision and F1 are kept for the logs: recall alone rewards long answers and
gives noise images ~0.8, so watch all three, and score held-out prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowvram_ddpo.architectures import building_on
from lowvram_ddpo.config import RewardConfig
from lowvram_ddpo.errors import UserError, loading_errors
from lowvram_ddpo.rewards.base import ModelReward, register_reward
from lowvram_ddpo.rewards.bertscore import BertScorer
from lowvram_ddpo.rewards.captioners import Captioner, HttpCaptioner, LocalCaptioner

ROBERTA_LARGE = dict(  # roberta-large's config.json (for the memory estimate)
    vocab_size=50265,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
)
ESTIMATE_TOKENS = 64
"""Sentence length the memory estimate assumes for BERTScore (answers are <= 64 tokens)."""
VLM_PROMPT_TOKENS = 1024
"""Image and question tokens the estimate assumes a local VLM reads (LLaVA-1.5: 576 image
tokens; SmolVLM: 64 per image tile): an assumption, stated in the report."""
VLM_ANSWER_TOKENS = 64


def build_captioner(config: RewardConfig, dtype: torch.dtype) -> Captioner:
    if config.captioner == "http":
        return HttpCaptioner(
            url=config.captioner_url,
            model=config.captioner_model,
            timeout=config.captioner_timeout,
            retries=config.captioner_retries,
            parallel=config.captioner_parallel,
            api_key=config.captioner_api_key,
        )
    return LocalCaptioner.from_pretrained(config.captioner_model, dtype, config.captioner_4bit)


@register_reward(
    "prompt_alignment", "BERTScore recall of a VLM's description against the prompt (0-1)"
)
class PromptAlignmentReward(ModelReward):
    def __init__(
        self,
        config: RewardConfig,
        dtype: torch.dtype,
        captioner: Captioner | None = None,
        scorer: BertScorer | None = None,
    ) -> None:
        self.config = config
        self.batch_size = config.batch_size
        self.captioner = captioner or build_captioner(config, dtype)
        self.scorer = scorer or BertScorer.from_pretrained(
            config.bertscore_model, config.bertscore_layer, dtype
        )
        local = {"captioner": self.captioner} if isinstance(self.captioner, nn.Module) else {}
        self.module = nn.ModuleDict({"bertscore": self.scorer, **local})
        self.logged: dict[str, list[float]] = {"precision": [], "f1": []}
        self.captions: list[str] = []

    def references(self, prompts: list[str]) -> list[str]:
        return [self.config.reference_template.format(prompt=p) for p in prompts]

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        answers = self.captioner(images.detach().cpu(), self.config.question)
        scores = self.scorer(answers, self.references(prompts))
        self.logged["precision"] += scores.precision.tolist()
        self.logged["f1"] += scores.f1.tolist()
        self.captions += answers
        return scores.recall

    def extra_metrics(self) -> dict[str, float]:
        """Mean BERTScore precision and F1 since the last call (the epoch's)."""
        means = {f"reward_{k}": sum(v) / len(v) for k, v in self.logged.items() if v}
        self.logged = {k: [] for k in self.logged}
        self.captions = []
        return means

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> ModelReward:
        return _StandInAlignment(config, dtype, device)


class _StandInAlignment(ModelReward):
    """The alignment reward's accelerator work with random weights: the BERTScore encoder
    embedding answers and references and, with a local captioner, the VLM prefilling
    ``VLM_PROMPT_TOKENS`` + the answer's tokens with its KV cache (no generation, no
    server). The vision tower's activations are left out (small beside the language
    model's). ``captioner_4bit`` is counted in the estimate (``device_bytes``) but not
    applied to the random weights on a real device, where the figure is an upper bound."""

    def __init__(
        self, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        from transformers import AutoConfig, AutoModel, RobertaConfig

        encoder_config = (
            RobertaConfig(**ROBERTA_LARGE)
            if config.bertscore_model == "roberta-large"
            else AutoConfig.from_pretrained(config.bertscore_model)
        )
        with building_on(device, dtype):
            modules = {"bertscore": AutoModel.from_config(encoder_config)}
        self.quantised = 0
        if config.captioner == "local":
            from transformers import AutoModelForImageTextToText

            from lowvram_ddpo.memory.quantisation import quantised_savings

            vlm_config = _vlm_config(config.captioner_model)
            with building_on(device, dtype):
                vlm = AutoModelForImageTextToText.from_config(vlm_config)
            modules["captioner"] = vlm.requires_grad_(False)
            if config.captioner_4bit:
                self.quantised = quantised_savings(vlm, "nf4", skip=("lm_head",))[0]
        self.module = nn.ModuleDict(modules)
        self.batch_size = config.batch_size

    def device_bytes(self) -> int:
        return super().device_bytes() - self.quantised

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """[B] stand-in rewards (finite, meaningless) after the same work as scoring."""
        device = next(self.module.parameters()).device
        if "captioner" in self.module:
            tokens = VLM_PROMPT_TOKENS + VLM_ANSWER_TOKENS
            ids = torch.zeros(len(images), tokens, dtype=torch.long, device=device)
            self.module["captioner"].get_decoder()(input_ids=ids, use_cache=True)
        ids = torch.zeros(2 * len(images), ESTIMATE_TOKENS, dtype=torch.long, device=device)
        out = self.module["bertscore"](input_ids=ids, output_hidden_states=True)
        return out.last_hidden_state[: len(images)].float().mean(dim=(1, 2))


def _known_vlm_configs() -> dict:
    """Configs the estimate knows without a download: transformers' ``LlavaConfig()``
    defaults are documented as llava-hf/llava-1.5-7b-hf's (CLIP ViT-L/14-336 + a 7 B
    Llama), the 7 B sibling of the paper's LLaVA 13B captioner."""
    from transformers import LlavaConfig

    return {"llava-hf/llava-1.5-7b-hf": LlavaConfig}


def _vlm_config(name: str):  # noqa: ANN202
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except loading_errors():
        known = _known_vlm_configs().get(name)
        if known is not None:
            return known()
        raise UserError(
            f"the memory estimate needs the config of the captioner '{name}': download it "
            "(`hf download NAME config.json`) or set reward.captioner_model to a folder"
        ) from None
