"""Presets, overrides and validation."""

from __future__ import annotations

import pytest

from lowvram_ddpo.config import (
    apply_overrides,
    dump_toml,
    list_presets,
    load_config_file,
    load_preset,
    validate,
)
from lowvram_ddpo.errors import UserError

PAPER_TASKS = ("compressibility", "incompressibility")


def test_every_shipped_preset_loads_validates_and_has_a_description():
    presets = list_presets()
    for task in PAPER_TASKS:
        for suffix in ("", "-sf", "-rwr", "-sparse-rwr"):
            assert f"{task}{suffix}" in presets
    for name, description in presets.items():
        assert description, name
        validate(load_preset(name))


def test_paper_presets_carry_the_reference_hyperparameters():
    config = load_preset("incompressibility")
    assert config.model.name == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (
        50,
        1.0,
        5.0,
    )
    assert config.sample.batch_size * config.sample.batches_per_epoch == 256
    assert config.train.batch_size * config.train.gradient_accumulation_steps == 64
    assert (config.train.learning_rate, config.train.clip_range) == (3e-4, 1e-4)
    assert (config.stats.buffer_size, config.stats.min_count) == (16, 16)
    assert config.model.lora_rank == 4 and config.run.epochs == 100


def test_variants_extend_their_task():
    assert load_preset("compressibility").reward.name == "jpeg_compressibility"
    sf = load_preset("compressibility-sf")
    assert sf.train.algorithm == "ddpo-sf" and sf.reward.name == "jpeg_compressibility"
    assert load_preset("incompressibility-sparse-rwr").train.algorithm == "sparse-rwr"
    assert load_preset("incompressibility-rwr").train.algorithm == "rwr"


def test_overrides_are_typed():
    config = load_preset("incompressibility")
    apply_overrides(
        config,
        [
            "train.learning_rate=1e-4",
            "sample.num_steps=20",
            "run.grid_prompts=a cat,a dog",
            "memory.gradient_checkpointing=true",
            "prompts.source=simple_animals",
        ],
    )
    assert config.train.learning_rate == 1e-4
    assert config.sample.num_steps == 20
    assert config.run.grid_prompts == ["a cat", "a dog"]
    assert config.memory.gradient_checkpointing is True


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.learnig_rate=1", "unknown config key 'train.learnig_rate'"),
        ("nosection.x=1", "unknown config key"),
        ("sample.num_steps=many", "must be an integer"),
        ("train=1", "is a section"),
        ("no-equals", "expects key=value"),
    ],
)
def test_bad_overrides_say_what_is_wrong(assignment, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(load_preset("incompressibility"), [assignment])


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("sample.resolution=500", "multiple of 8"),
        ("sample.eta=0", "eta must be > 0"),
        ("train.algorithm=ppo", "unknown algorithm"),
        ("train.gradient_accumulation_steps=3", "not a multiple"),
        ("train.timestep_fraction=0", "timestep_fraction"),
        ("sample.noise_level=0", "noise_level must be > 0"),
        ("sample.sampler=euler", "sample.sampler must be one of"),
        ("train.algorithm=grpo", "set sample.group_size >= 2"),
        ("sample.group_size=7", "must divide the epoch's images"),
        ("sample.group_size=0", "group_size must be >= 1"),
        ("train.clip_range=0", "clip_range must be a positive number"),
        ("memory.uncheckpointed_levels=-1", "uncheckpointed_levels must be >= 0"),
        ("memory.uncheckpointed_levels=1", "set memory.gradient_checkpointing = true with it"),
    ],
)
def test_validation_rejects_settings_that_cannot_work(assignment, message):
    config = load_preset("incompressibility")
    apply_overrides(config, [assignment])
    with pytest.raises(UserError, match=message):
        validate(config)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UserError, match="unknown preset 'nope'.*incompressibility"):
        load_preset("nope")


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_preset("compressibility-sparse-rwr")
    apply_overrides(config, ['sample.negative_prompt="blurry, \\"low\\" quality"'])
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config))
    assert load_config_file(path) == config


def test_a_policy_gradient_with_no_trainable_step_is_one_line():
    """A flow model's last step is deterministic (never trained): one sampling step leaves
    GRPO nothing to train, said in one line that names the fix, not a division by zero in
    the fit's time model."""
    from lowvram_ddpo.config import trained_steps_per_sample

    config = load_preset("sd35m-grpo-incompressibility")
    config.sample.num_steps = 1
    with pytest.raises(UserError, match=r"set sample.num_steps to 2 or more"):
        trained_steps_per_sample(config.sample, config.train, trainable=0)
    config.sample.num_steps = 2
    assert trained_steps_per_sample(config.sample, config.train, trainable=1) == 1


def test_user_files_that_do_not_read_are_one_line_each(tmp_path, monkeypatch):
    """A run's config edited into invalid TOML, a prompt file saved as UTF-16 (Notepad's
    "Unicode"), a preset file named but not here (or a shipped preset's name with .toml),
    an extends that is not a name: one line each, saying what to do."""
    from lowvram_ddpo.config import load_config_file
    from lowvram_ddpo.prompts import load_prompts

    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "config.toml"
    broken.write_text("[run\nepochs = 2\n")
    with pytest.raises(UserError, match=r"config.toml is not valid TOML: .*line 1.*fix that line"):
        load_config_file(broken)
    utf16 = tmp_path / "prompts.txt"
    utf16.write_bytes("a cat\n".encode("utf-16"))
    with pytest.raises(UserError, match="prompts.txt is not UTF-8 text: save it as UTF-8"):
        load_prompts(str(utf16))
    with pytest.raises(UserError, match="for the shipped preset drop .toml: incompressibility"):
        load_preset("incompressibility.toml")
    with pytest.raises(UserError, match="no preset file mine.toml"):
        load_preset("mine.toml")
    (tmp_path / "odd.toml").write_text("extends = 5\n")
    with pytest.raises(UserError, match="extends must be a preset's name or file, got 5"):
        load_preset("odd.toml")


def test_a_preset_extends_a_file_beside_it(tmp_path, monkeypatch):
    """``extends = "parent.toml"`` in sub/child.toml means sub/parent.toml, whatever folder
    the command runs from (as an include would)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "parent.toml").write_text('extends = "incompressibility"\n[run]\nepochs = 3\n')
    (sub / "child.toml").write_text('extends = "parent.toml"\n[train]\nlearning_rate = 1e-4\n')
    monkeypatch.chdir(tmp_path)
    config = load_preset("sub/child.toml")
    assert config.run.epochs == 3 and config.train.learning_rate == 1e-4


def test_no_samples_per_epoch_names_the_flag():
    """``--samples-per-epoch 0`` named sample.batch_size, which the user never set."""
    from lowvram_ddpo.config import set_samples_per_epoch

    with pytest.raises(UserError, match=r"--samples-per-epoch must be at least 1 \(got 0\)"):
        set_samples_per_epoch(load_preset("incompressibility"), 0)
