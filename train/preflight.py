"""Every check `python -m train` makes before it builds anything, in one pass.

`launch.slurm` runs the same pass (with the job's world size) before it
submits, so a job never waits in the queue only to fail at start. What the
pass cannot know ahead is left to the run: whether the shards hold readable
samples (that needs reading them). The one exception: a classifier's
labels, read from the first training samples' .json (nothing is decoded).
"""

from __future__ import annotations

import math
from pathlib import Path

from train.config import Config, validate


class StartError(ValueError):
    """A config the run cannot start with; the message names the key and the fix."""


def check_start(cfg: Config, *, world_size: int, cuda: bool, run_dir: Path | None = None) -> None:
    """Raises StartError, naming the key at fault, for a config `python -m
    train` would refuse at start on `world_size` ranks (with CUDA GPUs or not).
    run_dir: the run's directory, if known, where trainer.resume=auto looks."""
    try:
        _check(cfg, world_size=world_size, cuda=cuda, run_dir=run_dir)
    except StartError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise StartError(str(e)) from None


def _check(cfg: Config, *, world_size: int, cuda: bool, run_dir: Path | None) -> None:
    from train.engine import batch_sizes, check_precision
    from train.tasks import task_for

    validate(cfg)
    check_precision(cfg.deepspeed.precision, cuda=cuda)
    batch_sizes(cfg.trainer, world_size)
    task = task_for(cfg.task.name)
    model = task.check(cfg).model  # the model the run would train (a task may adopt a pretrained one's)
    check_audio_features(cfg, model)
    check_shards(cfg)
    task.check_data(cfg)
    check_vocabulary(cfg, model)
    if cfg.trainer.resume == "none" or (cfg.trainer.resume == "auto" and run_dir is None):
        return
    from train.checkpoint import find_checkpoint
    from train.topology import check_resume

    # A path must hold a complete checkpoint; one of another world size must fit this one.
    step_dir = find_checkpoint(cfg.trainer.resume, run_dir=run_dir or Path("."))
    check_resume(cfg.trainer, step_dir, world_size)


def check_audio_features(cfg: Config, model) -> None:
    """A pretrained audio backbone (model.audio.arch=hf) must get the
    features its own feature extractor makes: the data settings that define
    them (data.audio_features, the STFT, the mels and frames, the
    normalisation) must be the backbone's (mm_models.hf.audio_input)."""
    from enum import Enum

    from mm_models.encoders import arch_name
    from mm_models.hf import HFError, audio_input

    if arch_name(model, "audio") != "hf":
        return
    try:
        wanted = audio_input(Path(model.audio.pretrained))
    except HFError as e:
        raise StartError(str(e)) from None
    if wanted is None:
        return
    kind, reads, settings = wanted

    def show(value) -> str:
        return value.value if isinstance(value, Enum) else str(value)

    def same(have, want) -> bool:
        if isinstance(want, float):
            return math.isclose(float(have), want, rel_tol=1e-6, abs_tol=1e-9)
        return show(have) == show(want)

    wrong = {k: v for k, v in settings.items() if not same(getattr(cfg.data, k), v)}
    if wrong:
        have = ", ".join(f"data.{k}={show(getattr(cfg.data, k))}" for k in wrong)
        fix = " ".join(f"data.{k}={show(v)}" for k, v in wrong.items())
        raise StartError(
            f"model.audio.arch=hf: the {kind} backbone (model.audio.pretrained={model.audio.pretrained}) reads "
            f"{reads}, but this run gives {have}; set {fix}"
        )


def check_shards(cfg: Config) -> None:
    """Every shard pattern names shards (local patterns match files; remote
    ones expand); nothing is downloaded or read."""
    from data_pipeline.loader import check_spec, source_specs
    from data_pipeline.sources import expand_shards

    data = cfg.data
    for key, spec, weight in source_specs(data, "heldout") + source_specs(data, "train"):
        try:
            check_spec(key, spec, weight)
        except ValueError as e:
            raise StartError(str(e)) from None
        try:
            expand_shards(spec, allow_pipe=data.allow_pipe)
        except (ValueError, OSError) as e:
            raise StartError(f"{key}={spec!r}: {e}") from None


def check_vocabulary(cfg: Config, model) -> None:
    """The tokenizer loads, and its ids fit the model's embedding table."""
    from data_pipeline.tokenizer import load_tokenizer
    from mm_models.encoders import arch_name

    try:
        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    except (ValueError, OSError) as e:
        raise StartError(f"data.tokenizer={cfg.data.tokenizer!r}: {e}") from None
    if arch_name(model, "text") != "hf" and vocab > model.vocab_size:
        raise StartError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but "
            f"model.vocab_size={model.vocab_size}; set model.vocab_size={vocab}"
        )
