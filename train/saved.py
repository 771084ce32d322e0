"""Reading a saved run: a checkpoint directory (of any ZeRO stage) or an
exported .safetensors, its training config and its model, without the
training machinery."""

from __future__ import annotations

import torch


def resolve_checkpoint(checkpoint: str) -> str:
    """An exported .safetensors as given; a checkpoint directory as the step
    directory it names now (see train.export.resolve_step_dir), so that the
    config and the weights read after it come from the same step even if a
    running job writes a newer one meanwhile."""
    from pathlib import Path

    from train.export import resolve_step_dir

    return checkpoint if Path(checkpoint).suffix == ".safetensors" else str(resolve_step_dir(Path(checkpoint)))


def saved_config(checkpoint: str) -> dict:
    """The training config a checkpoint directory or an exported .safetensors
    was saved with (model, fusion, objective, data, task, and the step),
    read without loading its weights."""
    from pathlib import Path

    from mm_models.io import read_config
    from train.export import CheckpointError, read_meta, resolve_step_dir

    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint={path}: no such file")
        return read_config(path)
    meta = read_meta(resolve_step_dir(path))
    return {**meta["config"], "step": meta.get("step")}


def load_for_eval(checkpoint: str, *, trust: bool = False) -> tuple[torch.nn.Module, dict]:
    """A plain fp32 model (PretrainModel or ClassifierModel) on CPU and the training config it was saved
    with (saved_config), from a checkpoint directory (consolidated as
    `train.export` does) or an exported .safetensors."""
    from pathlib import Path

    from mm_models import load
    from mm_models.io import build_loaded
    from train.export import CheckpointError, consolidate

    path = Path(resolve_checkpoint(checkpoint))
    config = saved_config(str(path))
    if path.suffix == ".safetensors":
        return load(path), config
    state = consolidate(path, trust=trust)  # the step directory; verified before anything is unpickled
    try:
        model = build_loaded(config, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config and weights do not make a model: {e}") from None
    return model.eval(), config
