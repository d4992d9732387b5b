"""Prompt-image alignment (the DDPO paper's fourth task): a vision-language model answers
a question about the image, and the reward is the BERTScore recall of its answer
against a reference sentence made from the prompt ("The image contains a cat riding a
bike"). Precision and F1 are kept for the logs: recall alone rewards long answers and
gives noise images ~0.8, so watch all three, and score held-out prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowvram_ddpo.config import RewardConfig
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
"""Sentence length the memory estimate assumes (answers are at most 64 new tokens)."""


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
    def on_meta(cls, config: RewardConfig, dtype: torch.dtype) -> ModelReward:
        from lowvram_ddpo.errors import UserError

        if config.captioner != "http":
            raise UserError(
                "the memory estimate does not cover a local captioner yet: use "
                "reward.captioner=http (the VLM elsewhere) for `bench memory`"
            )
        return _MetaBertScore(config, dtype)


class _MetaBertScore(ModelReward):
    """The memory of the local half of the remote-captioner setup: the BERTScore encoder
    embedding a micro-batch of answers and references."""

    def __init__(self, config: RewardConfig, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoModel, RobertaConfig

        encoder_config = (
            RobertaConfig(**ROBERTA_LARGE)
            if config.bertscore_model == "roberta-large"
            else AutoConfig.from_pretrained(config.bertscore_model)
        )
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                self.module = AutoModel.from_config(encoder_config)
        finally:
            torch.set_default_dtype(default)
        self.batch_size = config.batch_size

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        ids = torch.zeros(2 * len(images), ESTIMATE_TOKENS, dtype=torch.long, device="meta")
        return self.module(input_ids=ids, output_hidden_states=True).last_hidden_state
