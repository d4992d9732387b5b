"""The command line: ``lowvram-ddpo presets | rewards | train | sample``.

Parsing and messages only; the work is done by ``trainer`` and ``rollout``.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

if TYPE_CHECKING:
    from lowvram_ddpo.config import Config
    from lowvram_ddpo.memory.report import MemoryReport

from lowvram_ddpo.config import OWN_REWARD_HINT, REWARD_NAMES
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.allocator import configure_allocator

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="RL fine-tuning of Stable Diffusion on one consumer GPU: DDPO, RWR and RLCM "
    "(few-step consistency models), with LoRA, on the paper's rewards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
    rich_markup_mode=None,  # help texts say "[default: ...]": literal text, not markup
)


def _print_version(value: bool) -> None:
    if value:
        from lowvram_ddpo import __version__

        typer.echo(f"lowvram-ddpo {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """RL fine-tuning of Stable Diffusion on one consumer GPU: DDPO, RWR and RLCM
    (few-step consistency models), with LoRA, on the paper's rewards."""


@contextmanager
def _user_errors():  # noqa: ANN202
    """Print a UserError as one line and exit 2; no traceback for mistakes a user can fix."""
    try:
        yield
    except UserError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        raise typer.Exit(2) from None


@app.command()
def presets() -> None:
    """List every preset with a one-line description."""
    from lowvram_ddpo.config import list_presets, presets_dir

    with _user_errors():
        entries = list_presets()
    width = max(map(len, entries), default=0)
    for name, description in entries.items():
        typer.echo(f"{name.ljust(width)}  {description}")
    typer.echo(f"\n(preset files: {presets_dir()})")


@app.command()
def rewards() -> None:
    """List the available reward functions."""
    from lowvram_ddpo.rewards import available_rewards

    entries = available_rewards()
    width = max(map(len, entries), default=0)
    for name, description in entries.items():
        typer.echo(f"{name.ljust(width)}  {description}")
    typer.echo(
        f"\n(or {OWN_REWARD_HINT}: a function (images [B,3,H,W] in [0,1], prompts) -> "
        "B numbers; --reward my_reward.py:score)"
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(line: str) -> None:
    if line and _is_main_process():
        typer.echo(line)


def _fit_run(config, preset: str, resume: str, vram: str, assignments: list[str]):  # noqa: ANN001, ANN202
    """The run's settings fitted to its card (memory.vram), keeping the fields the user
    set; a resumed run keeps the settings it trained with unless --vram asks again (a
    fit to what the card has free now could change its base model's precision)."""
    from lowvram_ddpo.config import own_preset_fields
    from lowvram_ddpo.memory.fit import (
        compile_where_it_runs,
        fit_for_run,
        fit_new_run,
        held_fields,
    )
    from lowvram_ddpo.memory.units import means_as_written

    asked = _vram_asked(vram, assignments)
    if resume and not asked:
        if not means_as_written(config.memory.vram):
            _say("resuming with the settings the run trained with (--vram auto fits again)")
        # a run resumed on another machine: its compile mode where this one can run it
        config, line = compile_where_it_runs(config, held_fields(assignments))
        _say(line)
        return config
    own = [] if resume else own_preset_fields(preset)
    held = held_fields(own + assignments)
    if resume:  # its compile was weighed when it started
        config, line = fit_for_run(config, config.model.name, held, asked, _say, resumed=True)
    else:
        config, line = fit_new_run(config, held, asked, _say)
    _say(line)
    return config


def _vram_asked(vram: str, assignments: list[str]) -> bool:
    """Whether the command line, not a preset or a saved run, set memory.vram."""
    return bool(vram) or any(a.split("=", 1)[0].strip() == "memory.vram" for a in assignments)


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="Preset name (see `presets`) or a .toml path.")] = "",
    model: Annotated[str, typer.Option(help="Hub id or local diffusers folder.")] = "",
    output: Annotated[str, typer.Option(help="Run folder (default: runs/<preset>).")] = "",
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size in pixels.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per sample.")] = None,
    samples_per_epoch: Annotated[
        int | None, typer.Option(help="Images sampled per epoch, all processes together.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    algorithm: Annotated[
        str,
        typer.Option(
            help="ddpo-is, ddpo-sf, grpo, nft, rwr or sparse-rwr (RLCM: an rlcm-* preset)."
        ),
    ] = "",
    reward: Annotated[
        str,
        typer.Option(
            help=f"Maximise this reward instead of the preset's: {', '.join(REWARD_NAMES)}, "
            f"or {OWN_REWARD_HINT} (`lowvram-ddpo rewards`)."
        ),
    ] = "",
    prompts: Annotated[
        str,
        typer.Option(
            help="Train on these prompts: a text file (one per line) or a built-in set "
            "(imagenet_animals, simple_animals, nouns_activities, pocket_world); the grids "
            "then show three of them."
        ),
    ] = "",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any preset field: --set train.clip_range=2e-4"),
    ] = None,
    resume: Annotated[
        str, typer.Option(help="Continue the run in this folder from its last checkpoint.")
    ] = "",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    log_with: Annotated[
        str,
        typer.Option(
            help="Also log to tensorboard, wandb or none (RUN/logs) [default: the preset's "
            "run.log_with: auto = tensorboard when installed]."
        ),
    ] = "",
    vram: Annotated[
        str,
        typer.Option(
            help="Fit batch sizes and memory levers to a card of this size (e.g. 8GB), "
            "auto: to what this machine's GPU has free (the GPU presets' default), or off: "
            "the preset as written. Fields given with --set are kept."
        ),
    ] = "",
) -> None:
    """Fine-tune a LoRA on a reward: DDPO, RWR, or RLCM with the rlcm-* presets (a
    consistency model's few steps as the policy)."""
    from lowvram_ddpo.checkpoint import check_epochs_left, epochs_done
    from lowvram_ddpo.config import (
        apply_overrides,
        keep_samples_per_step,
        load_config_file,
        load_preset,
        resumable,
        set_field,
        set_samples_per_epoch,
        validate,
        with_absolute_reward_files,
    )
    from lowvram_ddpo.preflight import check_output_folder
    from lowvram_ddpo.processes import world_size

    with _user_errors():
        if resume:
            run_dir = Path(resume)
            if not (run_dir / "config.toml").is_file():
                raise UserError(f"{run_dir} is not a run folder (no config.toml): check --resume")
            changed = [
                name
                for name, value in [
                    ("--preset", preset),
                    ("--model", model),
                    ("--output", output),
                    ("--seed", seed),
                    ("--resolution", resolution),
                    ("--steps", steps),
                    ("--lr", lr),
                    ("--samples-per-epoch", samples_per_epoch),
                    ("--algorithm", algorithm),
                    ("--reward", reward),
                    ("--prompts", prompts),
                    ("--set", [s for s in set_ or [] if not resumable(s)]),
                ]
                if value
            ]
            if changed:
                raise UserError(
                    f"{', '.join(changed)} cannot change a run being resumed; only --epochs, "
                    "--vram, --log-with, --set memory.*, --set speed.* and --set "
                    "train.batch_size can"
                )
            config = load_config_file(run_dir / "config.toml")
            per_step = config.train.batch_size * config.train.gradient_accumulation_steps
            apply_overrides(config, set_ or [])
            keep_samples_per_step(config, per_step)  # a new micro-batch: accumulation follows
        else:
            if not preset:
                raise UserError("choose a preset with --preset (`lowvram-ddpo presets` lists them)")
            config = load_preset(preset)
            preset_prompts = (config.prompts.source, list(config.prompts.prompts))
            flags = {
                "model.name": model or None,
                "run.output": output or None,
                "run.seed": seed,
                "sample.resolution": resolution,
                "sample.num_steps": steps,
                "train.learning_rate": lr,
                "train.algorithm": algorithm or None,
                "reward.name": reward or None,
                "prompts.source": prompts or None,
            }
            for key, value in flags.items():
                if value is not None:
                    set_field(config, key, value, source="the command line")
            apply_overrides(config, set_ or [])
            with_absolute_reward_files(config.reward)  # the saved config, resumed elsewhere
            _grid_from_own_prompts(config, preset_prompts, set_ or [])
            if samples_per_epoch is not None:
                _say(set_samples_per_epoch(config, samples_per_epoch, world_size()))
            run_dir = Path(config.run.output or f"runs/{Path(preset).stem}")
            if (run_dir / "latest.json").exists():
                raise UserError(
                    f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                    "or pick another --output"
                )
            config.run.output = str(run_dir)
        if epochs is not None:
            config.run.epochs = epochs
        config.run.progress = progress and config.run.progress
        if log_with:
            config.run.log_with = log_with
        if vram:
            config.memory.vram = vram
        validate(config)
        from lowvram_ddpo.reporting.trackers import resolve_log_with

        resolve_log_with(config.run.log_with)  # a missing package: say so before loading
        if resume:
            check_epochs_left(run_dir, epochs_done(run_dir), config.run.epochs)
        check_output_folder(run_dir)  # before minutes of model loading (and the fit's seconds)
        config = _fit_run(config, preset, resume, vram, set_ or [])
        _say_allocator_setting()
        from lowvram_ddpo.trainer import train as run_training

        try:
            run_training(config, run_dir, resume=bool(resume))
        except KeyboardInterrupt:
            typer.secho(
                f"\ninterrupted: continue with `lowvram-ddpo train --resume {run_dir}`", err=True
            )
            raise typer.Exit(130) from None
    _say(_finished_line(run_dir))


def _grid_from_own_prompts(config, preset_prompts: tuple, assignments: list[str]) -> None:  # noqa: ANN001
    """Progress grids show the user's own prompts when they chose the training prompts
    (--prompts, --set prompts.*) and not the grid's (--set run.grid_prompts=...)."""
    from lowvram_ddpo.prompts import load_prompts, spread

    own = (config.prompts.source, list(config.prompts.prompts)) != preset_prompts
    if own and not any(a.startswith("run.grid_prompts") for a in assignments):
        config.run.grid_prompts = spread(
            load_prompts(config.prompts.source, config.prompts.prompts)
        )


def _say_allocator_setting() -> None:
    import torch

    note = configure_allocator()
    if torch.cuda.is_available():
        _say(note)


def _finished_line(run_dir: Path) -> str:
    from lowvram_ddpo.checkpoint import FULL_UNET_DIR
    from lowvram_ddpo.lora_export import LORA_WEIGHTS_NAME

    grids = run_dir / "grids"
    if (run_dir / LORA_WEIGHTS_NAME).is_file():
        return f"done: LoRA in {run_dir / LORA_WEIGHTS_NAME}, grids in {grids}"
    if (run_dir / FULL_UNET_DIR).is_dir():
        return f"done: fine-tuned UNet in {run_dir / FULL_UNET_DIR}, grids in {grids}"
    return (
        f"done: no epoch was trained, so no LoRA was written; the base model's grid is in {grids}"
    )


DEFAULT_SEEDS = [0, 1, 2, 3]
DEFAULT_SEEDS_TEXT = " ".join(map(str, DEFAULT_SEEDS))


@app.command()
def sample(
    prompts: Annotated[
        list[str] | None,
        typer.Option(
            "--prompts", help="A prompt (repeat the flag) [default: the --lora run's grid prompts]."
        ),
    ] = None,
    prompt_set: Annotated[
        str,
        typer.Option(help="Add a prompt set or file (e.g. nouns_activities_heldout)."),
    ] = "",
    lora: Annotated[str, typer.Option(help="Run folder, checkpoint folder or LoRA file.")] = "",
    model: Annotated[str, typer.Option(help="Base model (default: the run's).")] = "",
    seeds: Annotated[
        list[int] | None,
        typer.Option("--seeds", help=f"Seeds (repeat the flag) [default: {DEFAULT_SEEDS_TEXT}]."),
    ] = None,
    grid: Annotated[Path, typer.Option(help="Output PNG.")] = Path("grid.png"),
    steps: Annotated[
        int | None,
        typer.Option(help="Denoising steps [default: the run's, else 4 for an LCM, else 50]."),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale [default: the run's, else 5.0].")
    ] = None,
    eta: Annotated[
        float | None, typer.Option(help="DDIM eta (> 0) [default: the run's, else 1.0].")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Image size [default: the run's, else the model's].")
    ] = None,
    reward: Annotated[
        str,
        typer.Option(
            help=f"Score each image with a reward: {', '.join(REWARD_NAMES)}, or {OWN_REWARD_HINT}."
        ),
    ] = "",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    fp8: Annotated[
        bool | None,
        typer.Option(
            "--fp8/--no-fp8",
            help="The denoiser's weights in fp8: half its memory [default: as the run "
            "trained: fp8 for a run on a quantised base].",
        ),
    ] = None,
) -> None:
    """Render a grid (rows = prompts, columns = seeds): the base model and, with --lora, the
    fine-tuned one side by side. Without prompts, a run's own grid prompts."""
    from lowvram_ddpo.prompts import load_prompts
    from lowvram_ddpo.sampling import SampleRequest, render_comparison

    with _user_errors():
        every_prompt = list(prompts or []) + (load_prompts(prompt_set) if prompt_set else [])
        request = SampleRequest(
            prompts=every_prompt,
            seeds=seeds or DEFAULT_SEEDS,
            lora=lora,
            model=model,
            steps=steps,
            guidance_scale=guidance,
            eta=eta,
            resolution=resolution,
            reward=reward,
            progress=progress,
            fp8=fp8,
        )
        result = render_comparison(request)
        grid.parent.mkdir(parents=True, exist_ok=True)
        result.image.save(grid)
    for line in result.report_lines():
        typer.echo(line)
    typer.echo(f"wrote {grid}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (or one of its checkpoint folders).")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="kohya (ComfyUI, A1111, Forge, kohya) or diffusers (load_lora_weights).",
        ),
    ] = "kohya",
    output: Annotated[
        Path | None,
        typer.Option(help="File to write [default: <run>-epoch<N>.safetensors in this folder]."),
    ] = None,
    epoch: Annotated[
        int | None, typer.Option(help="Export a kept checkpoint's epoch [default: the newest].")
    ] = None,
) -> None:
    """Write a run's LoRA as one .safetensors file for your UI (copy it into ComfyUI's
    models/loras or A1111's models/Lora)."""
    from lowvram_ddpo.checkpoint import export_lora

    with _user_errors():
        path = export_lora(run, format_, output, epoch)
    typer.echo(f"wrote {path} ({format_} layout)")


ARCH_HELP = (
    "sd15, sd15-lcm, sdxl, sd35m, flux2-klein, pocket, pocket-lcm, pocket-flow or a "
    "diffusers folder [default: the preset's pocket model, sd15-lcm for LCM presets, sdxl "
    "for SDXL models, sd35m for SD 3 models, flux2-klein for FLUX.2 models, else sd15]. "
    "Built from its config with random weights: nothing is downloaded."
)


BenchPreset = Annotated[str, typer.Option(help="Preset name or .toml path.")]
BenchArch = Annotated[str, typer.Option(help=ARCH_HELP)]
BenchVram = Annotated[
    str,
    typer.Option(
        help="Fit the settings to a card of this size first (e.g. 8GB, auto, or off: as "
        "written) [default: the preset's memory.vram: auto for the GPU presets]."
    ),
]
BenchResolution = Annotated[
    int | None, typer.Option(help="Image size [default: the preset's, or --arch's native size].")
]

bench_app = typer.Typer(
    help="Benchmarks: memory per phase; speed, throughput and MFU.",
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("memory")
def bench_memory(
    preset: BenchPreset,
    arch: BenchArch = "",
    resolution: BenchResolution = None,
    vram: BenchVram = "",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a preset field (repeatable).")
    ] = None,
    estimate: Annotated[
        bool, typer.Option(help="Estimate even when a CUDA GPU is present.")
    ] = False,
    card: Annotated[
        str,
        typer.Option(
            help="Rank and time the --vram fit for this card, not this machine's (e.g. "
            "'RTX 3060': its listed fp16 rate; a prediction). Implies --estimate."
        ),
    ] = "",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Peak accelerator memory of each phase of a DDPO epoch (sampling, decode, reward,
    training): measured on a CUDA GPU, else estimated on the meta device."""
    with _user_errors():
        from lowvram_ddpo.speed.time_model import assume_card, card_for_prediction

        named = card_for_prediction(card) if card else None
        with assume_card(named):
            report = _memory_report(
                preset, arch, resolution, set_ or [], vram, estimate or bool(card)
            )
        if named and not any(note.startswith("--vram ") for note in report.notes):
            report.notes.append(  # nothing was fitted, so nothing was timed for the card
                f"--card {card} ranks and times a --vram fit: add the card's size, e.g. --vram 12GB"
            )
    typer.echo(report.to_json() if json_ else report.to_text())


def _memory_report(
    preset: str,
    arch: str,
    resolution: int | None,
    assignments: list[str],
    vram: str,
    estimate: bool,
) -> MemoryReport:
    """``bench memory``'s report: the settings fitted as a run would be, measured on this
    machine's CUDA GPU unless ``estimate``, else estimated on the meta device."""
    import torch

    measured = torch.cuda.is_available() and not estimate
    config, arch, notes, held, fitted = _bench_setup(
        preset, arch, resolution, assignments, vram, runs_here=measured
    )
    allocator = configure_allocator()
    if measured:
        from lowvram_ddpo.memory.measure import measure_run

        report = measure_run(config, arch)
        notes += [allocator] if allocator else []
    else:
        from lowvram_ddpo.memory.estimate import estimate_memory

        report = estimate_memory(config, arch)
    if not fitted and (arch == "sdxl" or (report.card_gb or 99) > 8):
        from lowvram_ddpo.memory.fit import smaller_card_hint

        hint = smaller_card_hint(config, arch, report.card_gb, held)
        notes += [hint] if hint else []
    report.notes = notes + report.notes
    return report


class BenchSetup(NamedTuple):
    config: Config
    arch: str
    notes: list[str]
    held: frozenset[str]
    """Fields the user set (own preset file, --set): a fit keeps them."""
    fitted: bool


def _bench_setup(
    preset: str,
    arch: str,
    resolution: int | None,
    assignments: list[str],
    vram: str = "",
    runs_here: bool = True,
) -> BenchSetup:
    """The preset with its overrides, fitted to the card as a run would be (``--vram``, or
    the preset's memory.vram), the architecture to build, notes about the choices (without
    --arch, the preset's own model shape; with it, that model's native size), and the
    fields the user set. ``runs_here`` false (an estimate): the preset's compile mode is
    kept even where this machine could not run it (``fit_for_run``)."""
    from lowvram_ddpo.architectures import default_architecture, native_resolution
    from lowvram_ddpo.config import (
        apply_overrides,
        load_preset,
        own_preset_fields,
        set_field,
        validate,
    )
    from lowvram_ddpo.memory.fit import fit_for_run, held_fields

    config = load_preset(preset)
    apply_overrides(config, assignments)
    if resolution is not None:
        set_field(config, "sample.resolution", resolution, source="the command line")
    if vram:
        config.memory.vram = vram
    validate(config)
    notes = []
    preset_arch = default_architecture(config.model.name)
    native = native_resolution(arch) if arch and resolution is None else None
    if native is not None and native != native_resolution(preset_arch):
        config.sample.resolution = native
        notes.append(f"resolution {native}: {arch}'s native size (--resolution to change)")
    arch = arch or preset_arch
    held = held_fields(own_preset_fields(preset) + assignments)
    fitted, line = fit_for_run(
        config, arch, held, _vram_asked(vram, assignments), runs_here=runs_here
    )
    # a fit's own summary (not a note on no fit), after any note on the compile mode
    ran_fit = any(part.startswith("--vram ") for part in line.splitlines())
    return BenchSetup(fitted, arch, notes + ([line] if line else []), held, ran_fit)


@bench_app.command("speed")
def bench_speed(
    preset: BenchPreset,
    arch: BenchArch = "",
    resolution: BenchResolution = None,
    batches: Annotated[int, typer.Option(help="Sampling batches per epoch.", min=1)] = 2,
    epochs: Annotated[
        int,
        typer.Option(
            help="Epochs to run: a warm-up, then the ones timed (their mean; more show "
            "whether the peak memory still grows).",
            min=2,
        ),
    ] = 2,
    peak_tflops: Annotated[
        float | None,
        typer.Option(help="The GPU's dense fp16 TFLOP/s, for MFU [default: from its name]."),
    ] = None,
    vram: BenchVram = "",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a preset field (repeatable).")
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Write the last epoch's profile here: PyTorch's operators by time on the "
            "GPU and on the host (that epoch runs slower for it)."
        ),
    ] = None,
) -> None:
    """Seconds per phase of an epoch, images per second and model FLOPs utilisation, from a
    short real run on this machine (random weights: nothing is downloaded)."""
    with _user_errors():
        config, arch, notes, _, _ = _bench_setup(preset, arch, resolution, set_ or [], vram)
        allocator = configure_allocator()
        from lowvram_ddpo.speed.bench import measure_speed

        report = measure_speed(config, arch, batches, peak_tflops, epochs, profile)
        import torch

        if allocator and torch.cuda.is_available():
            notes.append(allocator)
        report.notes = notes + report.notes
    typer.echo(report.to_json() if json_ else report.to_text())


def main() -> None:
    configure_allocator()  # before torch is imported, so before CUDA can start
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
