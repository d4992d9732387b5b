"""Does a pocket run keep its prompts? Prompt accuracy before and after its LoRA.

    python benchmarks/pocket_prompt_accuracy.py runs/pocket-rlcm-incompressibility [--json F]

Renders the 160 pocket-world captions x 2 seeds with the run's own sampler, steps, guidance
and resolution (from its config.toml), first with the base model, then with the run's
LoRA loaded by diffusers' ``load_lora_weights``, and reads every image with the shipped
world classifier: prompt accuracy = shape AND colour right (as the README's figures);
size, background and the mean JPEG size are printed beside it, since a reward can win by
drawing every shape large.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowvram_ddpo.config import load_config_file
from lowvram_ddpo.lora_export import LORA_WEIGHTS_NAME
from lowvram_ddpo.models import POCKET_DIR, load_pipeline
from lowvram_ddpo.pocket import world
from lowvram_ddpo.pocket.classifier import caption_matches, load_classifier
from lowvram_ddpo.policy import build_policy
from lowvram_ddpo.rewards.jpeg import jpeg_sizes
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.text_encoding import PromptCache, encode_negative

SEEDS = 2
CHUNK = 64


@torch.no_grad()
def render_captions(pipe, policy, config, negative, cache) -> torch.Tensor:  # noqa: ANN001
    """Every caption once per seed, one generator per seed, in chunks (as the pocket
    training script measures its models)."""
    s, captions, images = config.sample, world.all_captions(), []
    for seed in range(SEEDS):
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(captions), CHUNK):
            chunk = captions[start : start + CHUNK]
            batch = sample_trajectories(
                pipe, pipe.unet, policy, chunk, negative, s.guidance_scale, s.resolution,
                generator, cache=cache,
            )  # fmt: skip
            images.append(batch.images)
    return torch.cat(images)


def score(classifier, images: torch.Tensor) -> dict[str, float]:  # noqa: ANN001
    captions = world.all_captions() * SEEDS
    predicted = classifier.predict(images)
    pairs = list(zip(captions, predicted, strict=True))

    def share(ok) -> float:  # noqa: ANN001
        return round(sum(ok(c.split(), p) for c, p in pairs) / len(pairs), 4)

    return {
        "prompt_accuracy": round(sum(caption_matches(c, p) for c, p in pairs) / len(pairs), 4),
        "shape_accuracy": share(lambda words, p: p["shape"] == words[3]),
        "color_accuracy": share(lambda words, p: p["color"] == words[2]),
        "size_accuracy": share(lambda words, p: p["size"] == words[1]),
        "background_accuracy": share(lambda words, p: p["background"] == words[6]),
        "jpeg_kb_mean": round(jpeg_sizes(images).mean().item(), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = load_config_file(args.run / "config.toml")
    s = config.sample
    pipe = load_pipeline(config.model.name, torch.float32)
    policy = build_policy(s.sampler, pipe.scheduler.config, pipe.unet.config, s.num_steps, s.eta)
    negative, cache = encode_negative(pipe, s.negative_prompt), PromptCache()
    classifier = load_classifier(POCKET_DIR / "world_classifier.safetensors")
    result = {"run": str(args.run), "model": config.model.name}
    result["before"] = score(classifier, render_captions(pipe, policy, config, negative, cache))
    pipe.load_lora_weights(str(args.run), weight_name=LORA_WEIGHTS_NAME)
    result["after"] = score(classifier, render_captions(pipe, policy, config, negative, cache))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
