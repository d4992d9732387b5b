"""A small CNN that reads a pocket-world image's ground truth back (shape, colour, size,
background): it measures how often a model draws what its prompt asked for."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowvram_ddpo.pocket import world

HEADS = {
    "shape": list(world.SHAPES),
    "color": list(world.COLORS),
    "size": list(world.SIZES),
    "background": list(world.BACKGROUNDS),
}


class WorldClassifier(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 2 * width), nn.Flatten()
        )
        hidden = 2 * width * (world.SIZE // 8) ** 2
        self.trunk = nn.Sequential(nn.Linear(hidden, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` [B, 3, 32, 32] in [0, 1] -> logits per attribute."""
        h = self.trunk(self.features(images * 2 - 1))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, str]]:
        logits = self(images)
        picks = {k: v.argmax(dim=1).tolist() for k, v in logits.items()}
        return [{k: HEADS[k][picks[k][i]] for k in HEADS} for i in range(len(images))]


def save_classifier(model: WorldClassifier, path: Path) -> None:
    save_file(model.state_dict(), path, metadata={"heads": json.dumps(HEADS)})


def load_classifier(path: Path) -> WorldClassifier:
    model = WorldClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def caption_matches(caption: str, predicted: dict[str, str]) -> bool:
    """Does the image show the caption's shape in the caption's colour?"""
    words = caption.split()
    return predicted["color"] == words[2] and predicted["shape"] == words[3]


def prompt_accuracy(classifier: WorldClassifier, images: Tensor, captions: list[str]) -> float:
    predictions = classifier.predict(images)
    hits = [caption_matches(c, p) for c, p in zip(captions, predictions, strict=True)]
    return sum(hits) / len(hits)
