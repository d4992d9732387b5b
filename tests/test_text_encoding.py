"""Prompt embeddings: encoded once per distinct prompt, independent of their batch."""

from __future__ import annotations

import torch

from lowvram_ddpo.offload import Offloader
from lowvram_ddpo.policy import DDIMPolicy
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.text_encoding import PromptCache, encode_text


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_each_prompt_is_encoded_once_and_alone(tiny_pipeline):
    pipe = tiny_pipeline
    calls = _count_calls(pipe.text_encoder)
    cache = PromptCache()
    first = cache.encode(pipe, ["a cat", "a dog", "a cat"])
    assert len(calls) == 2 and len(cache) == 2  # "a cat" once, "a dog" once
    assert torch.equal(first.hidden[0], first.hidden[2])
    again = cache.cached(["a dog", "a cat"])
    assert len(calls) == 2 and cache.missing(["a dog", "a cat"]) == []
    alone = encode_text(pipe, ["a dog"]).hidden[0]
    assert torch.equal(first.hidden[1], alone) and torch.equal(again.hidden[0], alone)


def test_the_cache_keeps_at_most_its_capacity(tiny_pipeline):
    cache = PromptCache(capacity=2)
    embeds = cache.encode(tiny_pipeline, ["one", "two", "three"])
    assert len(embeds) == 3 and len(cache) == 2
    assert cache.missing(["one", "two", "three"]) == ["three"]


def test_the_cache_keeps_at_most_its_bytes_and_warming_stops_when_full(tiny_pipeline):
    one = encode_text(tiny_pipeline, ["one"]).hidden.nbytes
    cache = PromptCache(max_bytes=2 * one + one // 2)  # room for two embeddings and a half
    calls = _count_calls(tiny_pipeline.text_encoder)
    assert cache.warm(tiny_pipeline, ["one", "two", "three", "four"]) == 2
    assert len(calls) == 3  # the third did not fit: warming stops, "four" is not encoded
    assert cache.missing(["one", "two", "three"]) == ["three"] and cache.bytes == 2 * one
    calls.clear()
    embeds = cache.encode(tiny_pipeline, ["three", "one"])  # encoded, not kept
    assert len(embeds) == 2 and len(cache) == 2 and len(calls) == 1
    full = PromptCache(capacity=1)
    full.warm(tiny_pipeline, ["one"])
    calls.clear()
    assert full.warm(tiny_pipeline, ["two", "three"]) == 0 and calls == []  # full: none


def test_sampling_moves_the_text_encoder_only_for_new_prompts(tiny_pipeline):
    """With offloading, a batch of known prompts leaves the text encoder on the CPU."""
    pipe = tiny_pipeline
    offloader = Offloader(torch.device("cpu"))
    offloader.register("text_encoder", pipe.text_encoder)
    offloader.register("vae", pipe.vae)
    moves = []
    original = offloader.loaded

    def loaded(name: str):  # noqa: ANN202
        moves.append(name)
        return original(name)

    offloader.loaded = loaded
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=2, eta=1.0)
    cache = PromptCache()
    for _ in range(2):
        with torch.no_grad():
            sample_trajectories(
                pipe,
                pipe.unet,
                policy,
                ["a cat", "a dog"],
                None,
                1.0,
                32,
                torch.Generator(),
                offloader=offloader,
                cache=cache,
            )
    assert moves == ["text_encoder", "vae", "vae"]
