"""`python -m train.export checkpoint=DIR out=FILE.safetensors`

Consolidates a training checkpoint of any ZeRO stage into one fp32 state dict
(DeepSpeed's own zero_to_fp32, on CPU, in this one process) and writes

    FILE.safetensors   the weights (the config also in its metadata, under "config")
    FILE.json          {"model", "fusion", "objective", "data", "step", "checkpoint"}

DIR is a step directory (checkpoints/step_000500/), a checkpoints/ directory
or a run directory (the checkpoint its `latest` file names). Load the result
with `mm_models.load(FILE)`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from train.checkpoint import complete_checkpoint

# What an export keeps of the training config: enough to rebuild the model
# (model, fusion, objective; task for a classifier) and to decode its inputs (data).
# tokenizer_sha256: what the text tower's token ids mean (data_pipeline.tokenizer.tokenizer_digest),
# checked when the export is fine-tuned with another data.tokenizer.
EXPORTED_SECTIONS = ("model", "fusion", "objective", "task", "data", "tokenizer_sha256")


class CheckpointError(Exception):
    """A path that is not a usable checkpoint; the message names the fix."""


def resolve_step_dir(path: str | Path) -> Path:
    """The step directory of a checkpoint: `path` itself if it holds meta.json,
    else the one named by `latest` in path or path/checkpoints."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint={path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint={path} is not a directory (give a step directory or checkpoints/)")
    try:
        step_dir = complete_checkpoint(path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    if step_dir is None:
        raise CheckpointError(
            f"checkpoint={path} is not a checkpoint: no meta.json and no 'latest' file "
            "(give OUT/checkpoints/step_NNNNNN or OUT/checkpoints)"
        )
    return step_dir


def read_meta(step_dir: Path) -> dict:
    meta = json.loads((step_dir / "meta.json").read_text())
    if "config" not in meta:
        raise CheckpointError(f"{step_dir / 'meta.json'} has no 'config': not written by `python -m train`")
    return meta


def consolidate(step_dir: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """One fp32 state dict on CPU from a checkpoint of any ZeRO stage (its
    files verified first unless trust: see train.checkpoint.verify_checkpoint)."""
    from train.checkpoint import UntrustedCheckpoint, verify_checkpoint

    try:
        verify_checkpoint(step_dir, trust=trust)
    except UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from None
    has_optim_shards = any(step_dir.glob("*_optim_states.pt"))
    if not has_optim_shards:
        # ZeRO-0 in fp32 keeps no separate master copy: the engine saves the
        # full fp32 module in mp_rank_00_model_states.pt.
        states = step_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{step_dir} holds no DeepSpeed model states (*_model_states.pt)")
        module = torch.load(states, map_location="cpu", weights_only=True)["module"]
        return {k: v.float().contiguous() for k, v in module.items()}
    # DeepSpeed's import and zero_to_fp32 print progress to stdout; keep stdout for our results.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k: v.float().contiguous() for k, v in state.items()}


# What an export keeps of a Hugging Face backbone's directory: enough to
# rebuild the module and its inputs (the weights are in the export itself).
HF_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def bundle_pretrained_configs(config: dict, out_dir: Path) -> None:
    """Makes an export self-contained: copies each hf backbone's config (and
    tokenizer) into out_dir/hf/<modality>/, and a trained tokenizer JSON
    (data.tokenizer=FILE) to out_dir/tokenizer.json, and points the exported
    config there, relative to the export. mm_models.io.read_config resolves
    them, so the export loads, with its tokenizer, on a machine without the
    original files."""
    import shutil

    data = config.get("data", {})
    tokenizer = data.get("tokenizer")
    for modality in ("image", "audio", "text"):
        enc = config.get("model", {}).get(modality, {})
        if enc.get("arch") != "hf" or not enc.get("pretrained"):
            continue
        src, rel = Path(enc["pretrained"]), f"hf/{modality}"
        (out_dir / rel).mkdir(parents=True, exist_ok=True)
        for name in HF_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / rel / name)
        if tokenizer and tokenizer != "byte" and Path(tokenizer).resolve() == src.resolve():
            data["tokenizer"] = rel
        enc["pretrained"] = rel
    if tokenizer and tokenizer != "byte" and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
        data["tokenizer"] = "tokenizer.json"


def write_weights(state: dict[str, torch.Tensor], out: Path, *, metadata: dict[str, str]) -> None:
    """safetensors' save_file, then the mode any file the user writes gets
    (safetensors creates its files 0600)."""
    import os

    from safetensors.torch import save_file

    save_file(state, str(out), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)


def export(checkpoint: str | Path, out: str | Path, *, trust: bool = False) -> tuple[Path, Path, int]:
    """Writes out (.safetensors) and its .json; returns both paths and the parameter count."""
    step_dir = resolve_step_dir(checkpoint)
    meta = read_meta(step_dir)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"out={out} should end in .safetensors")
    state = consolidate(step_dir, trust=trust)
    config = {k: json.loads(json.dumps(meta["config"][k])) for k in EXPORTED_SECTIONS if k in meta["config"]}
    config.update(step=meta.get("step"), checkpoint=str(step_dir.resolve()))
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle_pretrained_configs(config, out.parent)
    write_weights(state, out, metadata={"config": json.dumps(config, sort_keys=True), "format": "pt"})
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return out, config_path, sum(t.numel() for t in state.values())


@dataclass
class ExportArgs:
    """The command line of `python -m train.export` (see USAGE)."""

    checkpoint: str = MISSING
    out: str = MISSING
    trust_checkpoint: bool = False


USAGE = """usage: python -m train.export checkpoint=DIR out=FILE.safetensors

Consolidates a training checkpoint (any ZeRO stage) into one safetensors
file and its .json config; load it with mm_models.load(FILE).

  checkpoint=DIR   a step directory (OUT/checkpoints/step_000500), a
                   checkpoints/ directory or a run directory (its latest step)
  out=FILE         where to write FILE.safetensors (and FILE.json)
  trust_checkpoint=true
                   skip the check that the checkpoint's files hold only tensors
                   and DeepSpeed's plain state (loading a crafted file could run
                   code): only for checkpoints from a source you trust

example: python -m train.export checkpoint=outputs/2026-11-30/10-00-00 out=model.safetensors
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    from train.cli import UsageError, compose_args
    from train.secrets import redact_streams

    redact_streams()
    try:
        args, _ = compose_args(ExportArgs, argv, tool="train.export")
        weights, config, n_params = export(args.checkpoint, args.out, trust=args.trust_checkpoint)
    except (CheckpointError, UsageError) as e:
        print(f"train.export: error: {e}", file=sys.stderr)
        return 2
    print(f"weights: {weights}\nconfig:  {config}\nparameters: {n_params:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
