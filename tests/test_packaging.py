"""The wheel carries the presets and the pocket weights: installed elsewhere, it works from
another folder with `--model pocket`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowvram_ddpo.models import POCKET_DIR

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("lowvram_ddpo-*.whl")
    return path


def test_wheel_contains_presets_prompts_and_pocket_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (ROOT / "presets").glob("*.toml"):
        assert f"lowvram_ddpo/presets/{preset.name}" in names
    assert "lowvram_ddpo/prompts/imagenet_animals.txt" in names
    shipped = [p for p in POCKET_DIR.rglob("*") if p.is_file()]
    for path in shipped:
        assert f"lowvram_ddpo/pocket/weights/{path.relative_to(POCKET_DIR)}" in names


@pytest.mark.skipif(not (POCKET_DIR / "pocket-sd").is_dir(), reason="pocket weights not built")
def test_installed_wheel_runs_the_pocket_model_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import lowvram_ddpo, lowvram_ddpo.config as c;"
        "from lowvram_ddpo.models import load_pipeline;"
        "print(lowvram_ddpo.__file__);"
        "print(sorted(c.list_presets()));"
        "p = load_pipeline('pocket');"
        "print(type(p).__name__, p.unet.config.sample_size)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(str(target))  # the installed copy, not the checkout
    assert "pocket-incompressibility" in lines[1] and "incompressibility" in lines[1]
    assert lines[-1] == "StableDiffusionPipeline 8"
