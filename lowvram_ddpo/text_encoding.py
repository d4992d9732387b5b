"""Prompts to the UNet's text conditioning, for Stable Diffusion 1.x/2.x, SDXL and SD 3.x.

SD 1.x feeds the UNet the last hidden states of one CLIP text encoder. SDXL
concatenates the penultimate hidden states of two (CLIP ViT-L and OpenCLIP ViT-bigG),
and adds the second one's pooled, projected embedding and six "micro-conditioning"
numbers (original size, crop corner, target size) through ``added_cond_kwargs``:
what ``StableDiffusionXLPipeline`` does, reproduced here so that sampling and the
training pass see exactly the same inputs. SD 3.x's three encoders and FLUX.2's Qwen3 go
through their pipelines' own ``encode_prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowvram_ddpo import flux2


@dataclass
class TextEmbeds:
    """Encoded prompts: what a batch's UNet calls are conditioned on."""

    hidden: Tensor
    """[B, L, D] token embeddings (``encoder_hidden_states``)."""
    pooled: Tensor | None = None
    """[B, P] SDXL's pooled embedding of the second text encoder; None for SD 1.x/2.x."""

    def __len__(self) -> int:
        return len(self.hidden)

    def to(self, device: torch.device | str) -> TextEmbeds:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextEmbeds(self.hidden.to(device), pooled)

    def __getitem__(self, index: Tensor | slice | list[int]) -> TextEmbeds:
        return TextEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def expand(self, batch: int) -> TextEmbeds:
        """One embedding (a negative prompt) broadcast to ``batch`` rows, without copies."""
        hidden = self.hidden.expand(batch, *self.hidden.shape[1:])
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return TextEmbeds(hidden, pooled)

    @staticmethod
    def cat(parts: list[TextEmbeds]) -> TextEmbeds:
        hidden = torch.cat([p.hidden for p in parts])
        if any(p.pooled is None for p in parts):
            return TextEmbeds(hidden)
        return TextEmbeds(hidden, torch.cat([p.pooled for p in parts]))  # type: ignore[misc]


SD3_T5_TOKENS = 128
"""T5 tokens per SD 3.x prompt (Flow-GRPO's setting; diffusers' default is 256): RL prompts
are short, and every token is attended to at every step."""


def sd3_t5_tokens(has_t5: bool, clip_tokens: int) -> int:
    """T5's token count; without T5 its tokens are zeros, as many as CLIP's (77): the T5
    context SD3 was trained with, and what it saw when T5 was dropped in training."""
    return SD3_T5_TOKENS if has_t5 else clip_tokens


def sd3_sequence_length(pipe) -> int:  # noqa: ANN001
    """``sd3_t5_tokens`` of a loaded SD 3 pipeline."""
    has_t5 = getattr(pipe, "text_encoder_3", None) is not None
    return sd3_t5_tokens(has_t5, int(pipe.tokenizer.model_max_length))


def is_sd3(pipe) -> bool:  # noqa: ANN001
    return hasattr(pipe, "text_encoder_3")


def is_sdxl(pipe) -> bool:  # noqa: ANN001  (any diffusers text-to-image pipeline)
    return getattr(pipe, "text_encoder_2", None) is not None and not is_sd3(pipe)


def text_encoders(pipe) -> nn.Module:  # noqa: ANN001
    """The pipeline's text encoder(s) as one module, so they are moved (offloaded) together."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    encoders = [getattr(pipe, name, None) for name in names]
    present = [encoder for encoder in encoders if encoder is not None]
    return present[0] if len(present) == 1 else nn.ModuleList(present)


def _token_ids(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> Tensor:  # noqa: ANN001
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(next(text_encoder.parameters()).device)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> Tensor:  # noqa: ANN001
    """[B, L, D] last hidden states of one CLIP text encoder, as SD 1.x/2.x feed the UNet."""
    return text_encoder(_token_ids(tokenizer, text_encoder, prompts))[0]


@torch.no_grad()
def encode_text(pipe, prompts: list[str]) -> TextEmbeds:  # noqa: ANN001
    """The conditioning of ``prompts`` for the pipeline's UNet (SD or SDXL) or, for SD 3.x,
    its transformer."""
    if is_sd3(pipe):
        return encode_sd3_text(pipe, prompts)
    if flux2.is_flux2(pipe):
        return TextEmbeds(flux2.encode_text(pipe, prompts))
    if not is_sdxl(pipe):
        return TextEmbeds(encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts))
    hidden, pooled = [], None
    pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    for tokenizer, encoder in pairs:
        out = encoder(_token_ids(tokenizer, encoder, prompts), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the projected pooled embedding of the last (bigG) encoder
    return TextEmbeds(torch.cat(hidden, dim=-1), pooled)


def encode_sd3_text(pipe, prompts: list[str]) -> TextEmbeds:  # noqa: ANN001
    """SD 3.x's conditioning, by its pipeline's own ``encode_prompt``: CLIP-L and CLIP-G
    penultimate states side by side, then T5's tokens (zeros when the folder has no T5:
    diffusers' way of running without it, ``sd3_sequence_length``), and the two CLIPs'
    pooled embeddings."""
    device = next(pipe.text_encoder.parameters()).device
    hidden, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=sd3_sequence_length(pipe),
    )
    return TextEmbeds(hidden, pooled)


def encode_negative(pipe, negative_prompt: str) -> TextEmbeds:  # noqa: ANN001
    """The unconditional embedding for classifier-free guidance. For SDXL base models an
    empty negative prompt is all zeros (``force_zeros_for_empty_prompt``), as diffusers
    does when no negative prompt is given."""
    embeds = encode_text(pipe, [negative_prompt])
    if is_sdxl(pipe) and not negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        return TextEmbeds(torch.zeros_like(embeds.hidden), torch.zeros_like(embeds.pooled))
    return embeds


class PromptCache:
    """Each distinct prompt's embedding, encoded once and kept on the CPU.

    With offloading, the text encoders then visit the GPU only for prompts not seen
    before; a run encodes its prompts in one visit before its first epoch (``warm``; a
    paper preset's 45-398 take a second or two), so sampling moves no text encoder at all
    (SDXL's weigh 1.6 GB). Text encoders on the CPU encode as prompts arrive instead
    (slow, and they never move). Each prompt is encoded alone, so its embedding never
    depends on the prompts it arrived with, and a resumed run sees the same values. At
    most ``capacity`` prompts and ``max_bytes`` of embeddings are kept (SD 1.5: 0.12 MB a
    prompt, SDXL ~0.3, SD 3 with T5 ~2.7, FLUX.2 ~7.9); later ones are encoded every time."""

    def __init__(self, capacity: int = 4096, max_bytes: int = 2 * 2**30) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._embeds: dict[str, TextEmbeds] = {}

    def __len__(self) -> int:
        return len(self._embeds)

    def missing(self, prompts: list[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self._embeds]

    def full(self) -> bool:
        return len(self._embeds) >= self.capacity or self.bytes >= self.max_bytes

    def _keep(self, prompt: str, embeds: TextEmbeds) -> bool:
        """Keep ``embeds`` if there is room; whether it was kept."""
        size = embeds.hidden.nbytes + (0 if embeds.pooled is None else embeds.pooled.nbytes)
        if len(self._embeds) >= self.capacity or self.bytes + size > self.max_bytes:
            return False
        self._embeds[prompt] = embeds
        self.bytes += size
        return True

    def encode(self, pipe, prompts: list[str]) -> TextEmbeds:  # noqa: ANN001
        """[B] embeddings on the CPU; the text encoders must be where they can run."""
        fresh = {p: encode_text(pipe, [p]).to("cpu") for p in self.missing(prompts)}
        rows = [self._embeds[p] if p in self._embeds else fresh[p] for p in prompts]
        for prompt, embeds in fresh.items():
            self._keep(prompt, embeds)
        return TextEmbeds.cat(rows)

    def warm(self, pipe, prompts: list[str], progress: bool = False) -> int:  # noqa: ANN001
        """Encode the ``prompts`` not cached yet, in order, until the cache is full, each
        alone as ``encode`` does; returns how many were kept."""
        before = len(self._embeds)
        todo = self.missing(prompts)
        for prompt in tqdm(todo, desc="encoding prompts", leave=False, disable=not progress):
            if self.full() or not self._keep(prompt, encode_text(pipe, [prompt]).to("cpu")):
                break  # the next would not fit either: prompts' embeddings are one size
        return len(self._embeds) - before

    def cached(self, prompts: list[str]) -> TextEmbeds:
        """[B] embeddings of prompts already encoded (``missing`` returned none of them)."""
        return TextEmbeds.cat([self._embeds[p] for p in prompts])


def micro_conditioning(unet_config: dict, resolution: int) -> Tensor | None:
    """SDXL's ``time_ids``: (original height, width, crop top, crop left, target height,
    width) for an uncropped square image; None for UNets without them (SD 1.x/2.x)."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
