"""Image grids with captions: rows are prompts, columns are seeds, panels side by side."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lowvram_ddpo.rewards.jpeg import to_pil

CAPTION_HEIGHT = 14
PAD = 4


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    draw.text(xy, text, fill="black", font=font)


def make_grid(
    panels: dict[str, Tensor],
    prompts: list[str],
    seeds: list[int],
    scores: dict[str, Tensor] | None = None,
) -> Image.Image:
    """One PNG: a panel per entry of ``panels`` ([P, S, 3, H, W] each), side by side.

    Each panel has a title, each row its prompt and each image its seed (and score).
    """
    first = next(iter(panels.values()))
    n_prompts, n_seeds, _, height, width = first.shape
    cell_w, cell_h = max(width, 64), height + CAPTION_HEIGHT
    label_w = 120
    panel_w = n_seeds * (cell_w + PAD)
    total_w = label_w + len(panels) * (panel_w + 2 * PAD)
    total_h = CAPTION_HEIGHT + n_prompts * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (total_w, total_h), "white")
    draw = ImageDraw.Draw(canvas)
    for row, prompt in enumerate(prompts):
        _label(draw, (2, CAPTION_HEIGHT + row * (cell_h + PAD) + height // 2), prompt, label_w - 4)
    for p, (title, images) in enumerate(panels.items()):
        x0 = label_w + p * (panel_w + 2 * PAD)
        _label(draw, (x0, 1), title, panel_w)
        for row in range(n_prompts):
            for col in range(n_seeds):
                x = x0 + col * (cell_w + PAD)
                y = CAPTION_HEIGHT + row * (cell_h + PAD)
                canvas.paste(to_pil(images[row, col]), (x, y))
                caption = f"seed {seeds[col]}"
                if scores is not None and title in scores:
                    caption += f" r={scores[title][row, col].item():.3g}"
                _label(draw, (x, y + height), caption, cell_w)
    return canvas
