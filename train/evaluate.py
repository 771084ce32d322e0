"""Held-out evaluation: embed every held-out sample, then retrieval metrics."""

from __future__ import annotations

import torch

from data_pipeline import DataConfig, build_loader
from mm_models.objectives import MODALITIES
from train.batch import to_device
from train.metrics import retrieval_metrics


@torch.no_grad()
def embed_split(model, loader, *, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """model: a PretrainModel (or DeepSpeed engine around one).

    Every rank runs every batch, so ZeRO-3 parameter gathers stay in step.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    embeds = {m: [] for m in MODALITIES}
    masks = {m: [] for m in MODALITIES}
    for batch in loader:
        batch = to_device(batch, device=device, dtype=dtype)
        out = module.embed(batch)
        for m in MODALITIES:
            embeds[m].append(out[m].float().cpu())
            masks[m].append(batch[f"{m}_mask"].cpu())
    module.train(was_training)
    return ({m: torch.cat(v) for m, v in embeds.items()}, {m: torch.cat(v) for m, v in masks.items()})


def evaluate_heldout(model, *, data: DataConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    loader = build_loader(data, split="heldout", batch_size=batch_size)
    embeds, masks = embed_split(model, loader, device=device, dtype=dtype)
    return retrieval_metrics(embeds, masks)


def results_table(results: dict) -> str:
    """A fixed-width table of R@k against chance, one row per pair."""
    lines = [f"{'pair':<12} {'n':>5} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'chance@1':>9} {'R@1/chance':>11}"]
    for pair, r in results.items():
        ratio = r["R@1"] / r["chance"]["R@1"]
        lines.append(
            f"{pair:<12} {r['n']:>5} {r['R@1']:>7.3f} {r['R@5']:>7.3f} {r['R@10']:>7.3f} "
            f"{r['chance']['R@1']:>9.4f} {ratio:>10.1f}x"
        )
    return "\n".join(lines)


# -- `python -m train.evaluate checkpoint=PATH [data.KEY=VALUE ...] [batch_size=N]` --------------

def load_for_eval(checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """A plain fp32 PretrainModel on CPU and the training config it was saved
    with (model, fusion, objective, data, and the step), from a checkpoint
    directory (consolidated as `train.export` does) or an exported .safetensors."""
    from pathlib import Path

    from mm_models import PretrainModel, load
    from mm_models.io import configs_from_dict, read_config
    from train.export import CheckpointError, consolidate, read_meta, resolve_step_dir

    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint={path}: no such file")
        return load(path), read_config(path)
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    config = {**meta["config"], "step": meta.get("step")}
    model = PretrainModel(*configs_from_dict(config))
    model.load_state_dict(consolidate(step_dir), strict=True)
    return model.eval(), config


def main(argv: list[str] | None = None) -> int:
    """Held-out retrieval of a checkpoint, in one process; the last stdout
    line is the same JSON object a training run prints at its end."""
    import sys

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from train.export import CheckpointError, parse_overrides
    from train.loop import final_json

    try:
        args = sys.argv[1:] if argv is None else argv
        options = parse_overrides([a for a in args if not a.startswith("data.")],
                                  allowed=("checkpoint", "batch_size", "device"))
        if not options.get("checkpoint"):
            raise CheckpointError("missing checkpoint=; usage: python -m train.evaluate checkpoint=DIR "
                                  "[data.heldout=SHARDS ...] [batch_size=N] [device=cpu]")
        model, config = load_for_eval(options["checkpoint"])
        # The data config saved with the run, then command-line overrides (type-checked, keys named).
        data = OmegaConf.merge(
            OmegaConf.structured(DataConfig), config.get("data", {}),
            OmegaConf.from_dotlist([a.removeprefix("data.") for a in args if a.startswith("data.")]),
        )
        data = OmegaConf.to_object(data)
        batch_size = int(options.get("batch_size") or config.get("trainer", {}).get("eval_batch_size", 128))
    except (CheckpointError, OmegaConfBaseException, ValueError) as e:
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    device = torch.device(options.get("device", "cpu"))
    model.to(device)
    results = {"step": config.get("step"), "heldout": evaluate_heldout(
        model, data=data, batch_size=batch_size, device=device, dtype=torch.float32)}
    print(results_table(results["heldout"]), file=sys.stderr)
    print(final_json(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
