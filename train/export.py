"""`python -m train.export checkpoint=DIR out=FILE.safetensors`

Consolidates a training checkpoint of any ZeRO stage into one fp32 state dict
(DeepSpeed's own zero_to_fp32, on CPU, in this one process) and writes

    FILE.safetensors   the weights (the config also in its metadata, under "config")
    FILE.json          {"model", "fusion", "objective", "data", "step", "checkpoint"}

DIR is a step directory (checkpoints/step_000500/), a checkpoints/ directory
or a run directory (the checkpoint its `latest` file names). Load the result
with `mm_models.load(FILE)`.

format=onnx also writes FILE.onnx beside it (train.onnx_export), and
quantize=int8 FILE.int8.onnx; checkpoint=FILE.safetensors (an export
already made) writes only those.
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
    out: str = ""  # required, except with checkpoint=FILE.safetensors (see usage)
    trust_checkpoint: bool = False
    format: str = "safetensors"
    quantize: str = "none"


USAGE = """usage: python -m train.export checkpoint=DIR out=FILE.safetensors [format=onnx] [quantize=int8]
       python -m train.export checkpoint=FILE.safetensors format=onnx [quantize=int8] [out=FILE.onnx]

Consolidates a training checkpoint (any ZeRO stage) into one safetensors
file and its .json config; load it with mm_models.load(FILE).

  checkpoint=DIR   a step directory (OUT/checkpoints/step_000500), a
                   checkpoints/ directory or a run directory (its latest step);
                   or an export (FILE.safetensors) for its ONNX graph alone
  out=FILE         where to write FILE.safetensors (and FILE.json)
  format=onnx      also write FILE.onnx beside it: encoders, fusion and head
                   in one ONNX graph with a dynamic batch axis, the config in
                   its metadata (run it with serve.onnx_backend.OnnxBackend;
                   needs pip install 'mmpretrain[onnx]'); default safetensors
  quantize=int8    also write FILE.int8.onnx, onnxruntime's dynamic int8
                   quantization of it (implies format=onnx); default none
  trust_checkpoint=true
                   skip the check that the checkpoint's files hold only tensors
                   and DeepSpeed's plain state (loading a crafted file could run
                   code): only for checkpoints from a source you trust

examples:
  python -m train.export checkpoint=outputs/2026-11-30/10-00-00 out=model.safetensors
  python -m train.export checkpoint=model.safetensors format=onnx quantize=int8
"""


def check_formats(args: ExportArgs) -> str:
    """The format to write: safetensors or onnx (quantize=int8 implies onnx)."""
    from train.cli import UsageError

    if args.format not in ("safetensors", "onnx"):
        raise UsageError(f"format={args.format}; choose safetensors or onnx")
    if args.quantize not in ("none", "int8"):
        raise UsageError(f"quantize={args.quantize}; choose none or int8")
    return "onnx" if args.quantize == "int8" else args.format


def export_existing(args: ExportArgs, fmt: str) -> dict:
    """checkpoint=FILE.safetensors: the ONNX graph of an export already made."""
    from train.cli import UsageError

    if fmt != "onnx":
        raise UsageError(
            f"checkpoint={args.checkpoint} is already an export: add format=onnx (or quantize=int8) "
            "to write its ONNX graph beside it"
        )
    if args.out and not args.out.endswith(".onnx"):
        raise UsageError(f"out={args.out}: with an export as checkpoint=, out= names the .onnx to write")
    return run_onnx_export(args.checkpoint, args.out or None, args.quantize)


def onnx_installed() -> None:
    from train.onnx_export import ExportError, require_onnx

    try:
        require_onnx()
    except ExportError as e:
        raise CheckpointError(str(e)) from None


def run_onnx_export(export_path, out, quantize: str) -> dict:
    from train.onnx_export import ExportError, export_onnx

    try:
        return export_onnx(export_path, out, quantize=quantize)
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:  # an unwritable directory, a full disk
        raise CheckpointError(f"cannot write the ONNX graph of {export_path}: {e}") from None


def print_onnx(result: dict) -> None:
    print(f"onnx:    {result['onnx']} ({result['kind']}; max |onnxruntime - torch| {result['max_difference']:.1e})")
    if result["int8"] is not None:
        print(f"int8:    {result['int8']}")


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
        fmt = check_formats(args)
        if args.checkpoint.endswith(".safetensors") and Path(args.checkpoint).is_file():
            print_onnx(export_existing(args, fmt))
            return 0
        if not args.out:
            raise UsageError("missing out=; see python -m train.export --help")
        if fmt == "onnx":
            onnx_installed()  # before the checkpoint is consolidated
        weights, config, n_params = export(args.checkpoint, args.out, trust=args.trust_checkpoint)
        print(f"weights: {weights}\nconfig:  {config}\nparameters: {n_params:,}")
        if fmt == "onnx":
            print_onnx(run_onnx_export(weights, None, args.quantize))
    except (CheckpointError, UsageError) as e:
        print(f"train.export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
