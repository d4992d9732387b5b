"""Prompt sets: the paper's built-in lists (package data) and user files.

Built-in sets hold bare names; prompts are "a(n) <name>" as in the paper.
``pocket_world`` is every caption of the pocket model's world (160 prompts).
"""

from __future__ import annotations

from pathlib import Path

from lowvram_ddpo.errors import UserError, read_user_text

_DATA = Path(__file__).parent
BUILTIN_SETS = {
    "imagenet_animals": "imagenet_animals.txt",  # ImageNet-1k classes 0-397
    "simple_animals": "simple_animals.txt",  # the 45 animals of the aesthetic task
    "nouns_activities": "nouns_activities.txt",  # those 45 x 3 activities (prompt alignment)
    # evaluation only: 10 animals and 3 activities the alignment task never trains on
    "nouns_activities_heldout": "nouns_activities_heldout.txt",
}


def with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _read_lines(path: Path) -> list[str]:
    return [
        line.strip() for line in read_user_text(path, "prompt file").splitlines() if line.strip()
    ]


def load_prompts(source: str, explicit: list[str] | None = None) -> list[str]:
    """The training prompts: an explicit list, a built-in set name, or a text file path."""
    if explicit:
        return list(explicit)
    if source in BUILTIN_SETS:
        return [with_article(name) for name in _read_lines(_DATA / BUILTIN_SETS[source])]
    if source == "pocket_world":
        from lowvram_ddpo.pocket.world import all_captions

        return all_captions()
    path = Path(source).expanduser()
    if path.is_file():
        prompts = _read_lines(path)
        if not prompts:
            raise UserError(f"prompt file {path} has no prompts (one per line)")
        return prompts
    raise UserError(
        f"unknown prompt source '{source}': use one of {', '.join(BUILTIN_SETS)}, pocket_world "
        "or the path of a text file with one prompt per line"
    )


GRID_ROWS = 3


def spread(prompts: list[str], count: int = GRID_ROWS) -> list[str]:
    """``count`` prompts spread evenly over the list (first, middle, ...), no repeats: the
    grid rows of a run on the user's own prompts."""
    unique = list(dict.fromkeys(prompts))
    rows = min(count, len(unique))
    return [unique[i * len(unique) // rows] for i in range(rows)]
