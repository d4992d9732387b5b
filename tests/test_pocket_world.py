"""The pocket world: captions, rendering, the word-level tokenizer, the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvram_ddpo.models import POCKET_DIR
from lowvram_ddpo.pocket import world
from lowvram_ddpo.pocket.classifier import load_classifier, prompt_accuracy
from lowvram_ddpo.pocket.tokenizer import build_tokenizer
from lowvram_ddpo.prompts import load_prompts


def test_captions_cover_the_world_and_follow_its_grammar():
    captions = world.all_captions()
    assert len(captions) == len(set(captions)) == 4 * 2 * (6 * 4 - 4)
    assert "a small red circle on a blue background" in captions
    assert load_prompts("pocket_world") == captions
    rng = np.random.default_rng(0)
    for caption in captions[::17]:
        assert world.scene_from_caption(caption, rng).caption == caption


def test_rendering_is_seeded_and_shows_the_colours():
    a, scenes = world.batch(8, np.random.default_rng(3))
    b, _ = world.batch(8, np.random.default_rng(3))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    scene = world.Scene("square", "red", "large", "blue", (16, 16), 10)
    image = world.render(scene).astype(int)
    assert tuple(image[16, 16]) == world.COLORS["red"]
    assert tuple(image[1, 1]) == world.COLORS["blue"]


def test_every_world_word_is_one_token():
    tokenizer = build_tokenizer(world.vocabulary())
    ids = tokenizer("a small red circle on a blue background").input_ids
    assert len(ids) == 8 + 2  # eight words and the two special tokens
    assert tokenizer("a cat").input_ids[1:-1] != []  # other words still tokenize


@pytest.mark.skipif(
    not (POCKET_DIR / "world_classifier.safetensors").is_file(), reason="pocket weights not built"
)
def test_shipped_classifier_reads_rendered_scenes():
    classifier = load_classifier(POCKET_DIR / "world_classifier.safetensors")
    images, scenes = world.batch(256, np.random.default_rng(123))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert prompt_accuracy(classifier, x, [s.caption for s in scenes]) > 0.95
