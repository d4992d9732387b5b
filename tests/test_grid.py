"""Grids people can read: big enough cells, wrapped prompts and titles, the user's prompts."""

from __future__ import annotations

import numpy as np
import torch

from lowvram_ddpo.cli import _grid_from_own_prompts
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.grid import LABEL_WIDTH, MIN_CELL, PAD, font, make_grid, wrap
from lowvram_ddpo.prompts import spread

PROMPTS = ["a large red circle on a black background", "a small yellow square"]


def _checkerboard(size: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((ys + xs) % 2).float().expand(3, size, size)


def test_small_images_are_enlarged_with_sharp_pixels():
    images = _checkerboard(16).expand(2, 2, 3, 16, 16)
    grid = np.asarray(make_grid({"base model": images}, PROMPTS, [0, 1]).convert("L"))
    assert grid.shape[1] >= LABEL_WIDTH + 2 * MIN_CELL
    # the first cell: each source pixel became a 16 x 16 block of one value
    x = LABEL_WIDTH
    black_then_white = (grid[:, x : x + 16] == 0).all(axis=1) & (
        grid[:, x + 16 : x + 32] == 255
    ).all(axis=1)
    top = np.nonzero(black_then_white)[0][0]  # the cell's first row (its pixel (0, 0) is black)
    cell = grid[top : top + MIN_CELL, LABEL_WIDTH : LABEL_WIDTH + MIN_CELL]
    blocks = cell.reshape(16, 16, 16, 16)
    assert (blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3))).all()
    assert set(np.unique(blocks[:, 0, :, 0])) == {0, 255}  # black and white, not blurred


def test_prompts_wrap_between_words_and_fit():
    width = LABEL_WIDTH - PAD
    text = "a large red circle on a black background with a long caption here"
    lines = wrap(text, width)
    assert len(lines) > 1
    assert all(font().getlength(line) <= width for line in lines)
    assert " ".join(lines) == text  # every word whole, in order
    long_word = "/home/me/" + "x" * 80 + "/run"
    assert "".join(wrap(long_word, width)) == long_word  # split only where it must be


def test_a_long_panel_title_makes_room_instead_of_being_cut():
    images = torch.rand(2, 2, 3, 16, 16)
    short = make_grid({"base": images}, PROMPTS, [0, 1])
    title = "with LoRA a-very-long-run-folder-name (epoch 30) " * 3
    long = make_grid({title: images}, PROMPTS, [0, 1])
    assert long.height > short.height and long.width == short.width


def test_the_user_s_own_prompts_become_the_grid_rows(tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("\n".join(f"a photo of thing {i}" for i in range(9)))
    config = load_preset("incompressibility")
    before = (config.prompts.source, list(config.prompts.prompts))
    preset_rows = list(config.run.grid_prompts)
    config.prompts.source = str(own)
    _grid_from_own_prompts(config, before, [])
    assert config.run.grid_prompts == [
        "a photo of thing 0",
        "a photo of thing 3",
        "a photo of thing 6",
    ]
    assert config.run.grid_prompts != preset_rows
    config.run.grid_prompts = ["kept"]  # the grid's rows set explicitly win
    _grid_from_own_prompts(config, before, ["run.grid_prompts=['kept']"])
    assert config.run.grid_prompts == ["kept"]
    assert spread(["a", "a", "b"]) == ["a", "b"]
