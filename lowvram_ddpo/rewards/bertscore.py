"""BERTScore (Zhang et al. 2020) on ``transformers``, without the bert-score package.

Each sentence becomes the L2-normalised hidden states of one encoder layer, one vector
per token (the tokenizer's special tokens such as <s>/</s> left out, as bert-score
does). Tokens are matched greedily by cosine similarity: recall is the mean over the
reference's tokens of their best match in the candidate, precision the same the other
way, F1 their harmonic mean. No idf weighting, no baseline rescaling: the DDPO
paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowvram_ddpo.errors import UserError, first_line, loading_errors

DEFAULT_ENCODER = "roberta-large"
DEFAULT_LAYER = 17
"""bert-score's English default (roberta-large, layer 17); the paper used
microsoft/deberta-xlarge-mnli at layer 40."""


@dataclass
class BertScores:
    precision: Tensor
    recall: Tensor
    f1: Tensor


def greedy_match(candidate: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(precision, recall) of two sets of normalised token embeddings [n, D] and [m, D]."""
    if len(candidate) == 0 or len(reference) == 0:  # an empty caption matches nothing
        zero = candidate.new_zeros(())
        return zero, zero
    similarity = reference @ candidate.T  # [m, n]
    recall = similarity.max(dim=1).values.mean()
    precision = similarity.max(dim=0).values.mean()
    return precision, recall


class BertScorer(nn.Module):
    """Scores candidate sentences against references with one encoder layer."""

    def __init__(self, model: nn.Module, tokenizer, layer: int) -> None:  # noqa: ANN001
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        layers = model.config.num_hidden_layers
        if not 0 <= layer <= layers:
            raise UserError(f"reward.bertscore_layer {layer} is outside 0..{layers} of the encoder")
        self.layer = layer

    @classmethod
    def from_pretrained(cls, name: str, layer: int, dtype: torch.dtype) -> BertScorer:
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name, dtype=dtype)
        except loading_errors() as err:
            raise UserError(
                f"could not load the BERTScore encoder '{name}' ({first_line(err)}); "
                "offline, download it first or set reward.bertscore_model to a folder"
            ) from None
        return cls(model, tokenizer, layer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def token_embeddings(self, sentences: list[str]) -> list[Tensor]:
        """Per sentence, [tokens, D] normalised hidden states of ``layer``, specials dropped."""
        batch = self.tokenizer(
            sentences,
            padding=True,
            truncation=True,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = batch.pop("special_tokens_mask").bool()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[self.layer].float()
        hidden = hidden / hidden.norm(dim=-1, keepdim=True)
        keep = batch["attention_mask"].bool().cpu() & ~special
        return [h[k.to(h.device)] for h, k in zip(hidden, keep, strict=True)]

    def forward(self, candidates: list[str], references: list[str]) -> BertScores:
        cand = self.token_embeddings(candidates)
        ref = self.token_embeddings(references)
        scores = [greedy_match(c, r) for c, r in zip(cand, ref, strict=True)]
        precision = torch.stack([p for p, _ in scores]).cpu()
        recall = torch.stack([r for _, r in scores]).cpu()
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
        return BertScores(precision, recall, f1)
