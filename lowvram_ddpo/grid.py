"""Image grids people can read: rows are prompts, columns are seeds, panels side by side.

Every cell is at least ``MIN_CELL`` pixels (small models' images are enlarged with
nearest-neighbour, so their pixels stay sharp), prompts and titles wrap between words
instead of being cut, and each image has its seed and, when scored, its reward under it.
"""

from __future__ import annotations

import math
from functools import cache

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lowvram_ddpo.rewards.jpeg import to_pil

MIN_CELL = 256
FONT_SIZE = 15
LINE = FONT_SIZE + 5
PAD = 8
LABEL_WIDTH = 220
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@cache
def font() -> Font:
    """PIL's own scalable font (no font file needed); its small bitmap font on a PIL built
    without FreeType."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):  # pragma: no cover - PIL without FreeType
        return ImageFont.load_default()


def _width(text: str) -> float:
    return font().getlength(text)


def _split_word(word: str, width: int) -> list[str]:
    """A word wider than a whole line (a long path): split where it must be."""
    pieces, piece = [], ""
    for char in word:
        if piece and _width(piece + char) > width:
            pieces.append(piece)
            piece = ""
        piece += char
    return pieces + [piece]


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken between words."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if _width(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        *whole, line = _split_word(word, width) if _width(word) > width else [word]
        lines.extend(whole)
    return lines + [line] if line else lines


def cell_scale(height: int) -> int:
    """The whole-number enlargement that makes an image at least ``MIN_CELL`` tall."""
    return max(1, math.ceil(MIN_CELL / height))


def _caption(seed: int, score: float | None) -> str:
    return f"seed {seed}" + ("" if score is None else f" · reward {score:.4g}")


def make_grid(
    panels: dict[str, Tensor],
    prompts: list[str],
    seeds: list[int],
    scores: dict[str, Tensor] | None = None,
) -> Image.Image:
    """One image: a panel per entry of ``panels`` ([P, S, 3, H, W] each), side by side,
    titled with its key; each row labelled with its prompt, each image with its seed and,
    when ``scores`` has the panel ([P, S]), its reward."""
    scores = scores or {}
    first = next(iter(panels.values()))
    n_prompts, n_seeds, _, height, width = first.shape
    scale = cell_scale(height)
    cell_w, cell_h = width * scale, height * scale
    panel_w = n_seeds * (cell_w + PAD) - PAD
    titles = {name: wrap(name, panel_w) for name in panels}
    title_h = LINE * max(len(lines) for lines in titles.values()) + PAD
    labels = [wrap(prompt, LABEL_WIDTH - PAD) for prompt in prompts]
    row_h = max(cell_h + LINE, LINE * max(map(len, labels), default=1)) + PAD
    total_w = LABEL_WIDTH + len(panels) * (panel_w + 2 * PAD)
    canvas = Image.new("RGB", (total_w, title_h + n_prompts * row_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for row, lines in enumerate(labels):
        top = title_h + row * row_h + max(0, (cell_h - LINE * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((PAD, top + i * LINE), line, fill="black", font=font())
    for p, (title, images) in enumerate(panels.items()):
        x0 = LABEL_WIDTH + p * (panel_w + 2 * PAD)
        for i, line in enumerate(titles[title]):
            draw.text((x0, PAD // 2 + i * LINE), line, fill="black", font=font())
        for row in range(n_prompts):
            y = title_h + row * row_h
            for col in range(n_seeds):
                x = x0 + col * (cell_w + PAD)
                image = to_pil(images[row, col])
                canvas.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
                score = scores[title][row, col].item() if title in scores else None
                caption = _caption(seeds[col], score)
                while _width(caption) > cell_w and " · " in caption:  # narrow: the reward
                    caption = caption.split(" · ")[-1]
                draw.text((x, y + cell_h + 2), caption, fill="black", font=font())
    return canvas
