"""Your own reward, without touching the package: ``reward.name = "my_reward.py:score"``
(a Python file and a name in it) or ``"package.module:score"`` (an importable module);
``lowvram-ddpo train --reward my_reward.py:score`` does the same.

The name is a function ``score(images, prompts)`` that returns one number per image
(a tensor, a list or a NumPy array); ``images`` is a float tensor ``[B, 3, H, W]`` in
[0, 1] on the CPU and ``prompts`` a list of B strings. Or it is a class: it is built
once, with no arguments (load a model in ``__init__``), and its instances are called
the same way. The file runs as Python when the run starts, because you named it: name
only files you trust, and treat a preset or a run's config.toml from someone else as
code too (its reward may name a file or any installed module). Errors are reported in
one line, with the file and line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from lowvram_ddpo.config import (
    OWN_REWARD_HINT,
    is_own_reward,
    own_reward_parts,
    own_reward_problem,
)
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards.base import check_rewards

PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep
LIBRARIES = ("site-packages", "dist-packages", str(Path(traceback.__file__).parent))


def _where(err: BaseException) -> str:
    """The innermost frame of the error in the user's own code (not this package, not a
    library it called): the line to look at."""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not f.filename.startswith((PACKAGE, "<"))  # "<frozen importlib...>"
        and not any(lib in f.filename for lib in LIBRARIES)
    ]
    if not frames:
        return ""
    return f"{Path(frames[-1].filename).name} line {frames[-1].lineno}: "


def _summary(err: BaseException) -> str:
    if isinstance(err, SyntaxError):  # raised by the compiler: the place is in the error
        place = f"{Path(err.filename or '?').name} line {err.lineno}: "
        return f"{place}SyntaxError: {err.msg}"
    return f"{_where(err)}{type(err).__name__}: {err}".splitlines()[0]


def _import_file(path: Path) -> ModuleType:
    # one module per file path, under a name no import of the user's can collide with
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)  # "r.v2" would read as a package
    name = f"lowvram_ddpo_own_reward_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path} as Python: name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(path.parent) not in sys.path:  # as for a script: its own helpers import
        sys.path.append(str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def import_own_reward(name: str) -> object:
    """The object ``name`` points to (a function or a class), imported; one-line errors."""
    if not is_own_reward(name):
        raise UserError(f"reward {name!r} is not {OWN_REWARD_HINT}")
    problem = own_reward_problem(name)
    if problem:
        raise UserError(problem)
    where, attribute = own_reward_parts(name)
    try:
        if where.endswith(".py"):
            module = _import_file(Path(where).expanduser().resolve())
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except ModuleNotFoundError as err:
        if err.name == where:
            raise UserError(
                f"reward {name!r}: no module {where} (a file must end in .py; a module must "
                "be on sys.path, e.g. through PYTHONPATH)"
            ) from None
        raise UserError(f"reward {name!r} could not be imported: {_summary(err)}") from None
    except Exception as err:  # the user's code: anything may go wrong in it
        raise UserError(f"reward {name!r} could not be imported: {_summary(err)}") from None
    if not hasattr(module, attribute):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(
            f"reward {name!r}: {where} has no {attribute!r} (it has: {', '.join(public) or '-'})"
        )
    target = getattr(module, attribute)
    if not callable(target):
        raise UserError(f"reward {name!r} is a {type(target).__name__}, not a function")
    return target


class OwnReward:
    """A user's reward function (or an instance of their class), its errors in one line."""

    def __init__(self, name: str) -> None:
        self.name = name
        target = import_own_reward(name)
        if isinstance(target, type):
            try:
                target = target()
            except Exception as err:
                raise UserError(f"reward {name!r} could not be built: {_summary(err)}") from None
        self.function = target

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        try:
            # fp32 whatever the run's dtype; no graph: a model of the user's has gradients on
            with torch.no_grad():
                scores = self.function(images.float(), prompts)
        except Exception as err:
            raise UserError(f"reward {self.name!r} failed: {_summary(err)}") from None
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(
                f"reward {self.name!r} returned a {type(scores).__name__}: return one number "
                "per image (a tensor, a list or a NumPy array)"
            ) from None
        # one finite number per image, checked here too: a mix would broadcast a scalar
        return check_rewards(scores.detach().cpu(), len(prompts), self.name)
