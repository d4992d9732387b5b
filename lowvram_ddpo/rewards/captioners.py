"""Captioners for the prompt-alignment reward: something that answers a question about
each image. Two kinds:

- ``HttpCaptioner``: an OpenAI-compatible chat-completions endpoint (vLLM, Ollama and
  llama.cpp's server serve vision-language models this way), so the VLM can run in
  another process or on another machine; requests in parallel, with a timeout and
  retries, and a one-line error when the server cannot be reached.
- ``LocalCaptioner``: a ``transformers`` image-text-to-text model loaded for the reward
  phase (optionally in 4-bit with bitsandbytes), greedy decoding.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lowvram_ddpo.errors import UserError, first_line, loading_errors
from lowvram_ddpo.rewards.jpeg import to_pil


class Captioner(Protocol):
    def __call__(self, images: Tensor, question: str) -> list[str]:
        """One answer per image ([B, 3, H, W] in [0, 1], CPU)."""


def png_data_url(image: Tensor) -> str:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class CaptionerError(UserError):
    pass


@dataclass
class HttpCaptioner:
    url: str
    """The server's base URL, e.g. http://127.0.0.1:8000/v1 (…/chat/completions is added)."""
    model: str
    """The model name the server expects in requests."""
    timeout: float = 60.0
    retries: int = 3
    parallel: int = 8
    """Requests in flight at once (servers batch concurrent requests themselves)."""
    max_tokens: int = 64
    api_key: str = ""

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def __call__(self, images: Tensor, question: str) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            return list(pool.map(lambda image: self.ask(image, question), images))

    def ask(self, image: Tensor, question: str) -> str:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": question},
                        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt * 0.1, 5.0))
            try:
                return self._post(body)
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} {err.reason}"
                if err.code < 500 and err.code != 429:  # the request itself is wrong
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                problem = f"{type(reason).__name__}: {reason}"
        raise CaptionerError(
            f"the captioner at {self.endpoint} failed after {self.retries + 1} tries ({problem}): "
            "start the server (e.g. `vllm serve MODEL`) or fix reward.captioner_url"
        )

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            reply = json.loads(response.read())
        try:
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise CaptionerError(
                f"the captioner at {self.endpoint} answered without choices[0].message.content: "
                "is it an OpenAI-compatible chat-completions server?"
            ) from None


class LocalCaptioner(torch.nn.Module):
    """A ``transformers`` vision-language model (AutoModelForImageTextToText + its
    processor), greedy decoding of at most ``max_tokens`` new tokens."""

    def __init__(self, model: torch.nn.Module, processor, max_tokens: int = 64) -> None:  # noqa: ANN001
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.max_tokens = max_tokens
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:  # batched generation continues after the prompt's last token
            tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(
        cls, name: str, dtype: torch.dtype, load_in_4bit: bool = False, max_tokens: int = 64
    ) -> LocalCaptioner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        options: dict = {"dtype": dtype}
        if load_in_4bit:
            from lowvram_ddpo.optimizers import bitsandbytes_usable

            if not bitsandbytes_usable():
                raise UserError(
                    "reward.captioner_4bit needs a CUDA GPU and bitsandbytes "
                    "(pip install 'lowvram-ddpo[bnb]')"
                )
            from transformers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        try:
            processor = AutoProcessor.from_pretrained(name)
            model = AutoModelForImageTextToText.from_pretrained(name, **options)
        except loading_errors() as err:
            raise UserError(
                f"could not load the captioning model '{name}' ({first_line(err)}); "
                "offline, download it first or set reward.captioner_model to a folder"
            ) from None
        return cls(model, processor, max_tokens)

    @torch.no_grad()
    def __call__(self, images: Tensor, question: str) -> list[str]:
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            for _ in images
        ]
        prompts = [
            self.processor.apply_chat_template(m, add_generation_prompt=True) for m in messages
        ]
        inputs = self.processor(
            images=[to_pil(image) for image in images],
            text=prompts,
            return_tensors="pt",
            padding=True,
        )
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [
            s.strip() for s in self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        ]
