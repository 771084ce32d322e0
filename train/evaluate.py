"""`python -m train.evaluate checkpoint=PATH [data.KEY=VALUE ...]`: the held-out
evaluation of a saved model (its task's: retrieval and zero-shot for a
pretrained model, accuracy and F1 for a classifier), in one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from train.saved import load_for_eval
from train.tasks import saved_task


@dataclass
class EvaluateArgs:
    """The command line of `python -m train.evaluate` (see USAGE)."""

    checkpoint: str = MISSING
    batch_size: int = 0  # 0: the run's trainer.eval_batch_size
    device: str = "cpu"
    trust_checkpoint: bool = False


USAGE = """usage: python -m train.evaluate checkpoint=PATH [data.KEY=VALUE ...] [batch_size=N] [device=cpu]

Held-out retrieval and zero-shot metrics of a checkpoint (for a fine-tuned
classifier: accuracy, macro-F1, per-class metrics), in one process: a table
on stderr, then the JSON line a training run prints at its end.

  checkpoint=PATH   a step directory, checkpoints/ or run directory, or an
                    exported .safetensors file
  data.KEY=VALUE    overrides of the data config saved with the run
                    (data.heldout=SHARDS evaluates other shards)
  batch_size=N      evaluation batch (default: the run's trainer.eval_batch_size)
  device=DEVICE     cpu (default) or cuda
  trust_checkpoint=true   skip the safe-loading check (see python -m train.export --help)

example: python -m train.evaluate checkpoint=outputs/2026-11-30/10-00-00 data.heldout=data/demo/heldout
"""


def check_heldout(data, *, overridden: bool) -> None:
    """The held-out shards exist, else a ValueError that says where the
    pattern came from: the one saved with the model is the training run's,
    relative to the directory it ran in."""
    from data_pipeline.sources import expand_shards

    try:
        expand_shards(data.heldout, allow_pipe=data.allow_pipe)
    except (ValueError, OSError) as e:
        where = "" if overridden else " (saved with the model: a relative path is read from where training ran)"
        raise ValueError(f"data.heldout={data.heldout!r}{where}: {e}; pass data.heldout=SHARDS") from None


def main(argv: list[str] | None = None) -> int:
    """Held-out retrieval of a checkpoint, in one process; the last stdout
    line is the same JSON object a training run prints at its end."""
    import sys

    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(USAGE, end="")
        return 0

    from train.cli import UsageError, compose_args, data_config
    from train.export import CheckpointError
    from train.secrets import redact_streams

    redact_streams()  # an error or a log line naming a signed URL prints it redacted
    try:
        args, data_overrides = compose_args(
            EvaluateArgs, sys.argv[1:] if argv is None else argv, tool="train.evaluate", data=True
        )
        model, config = load_for_eval(args.checkpoint, trust=args.trust_checkpoint)
        data = data_config(config.get("data", {}), data_overrides)
        check_heldout(data, overridden=any(o.startswith("data.heldout=") for o in data_overrides))
        batch_size = args.batch_size or int(config.get("trainer", {}).get("eval_batch_size", 128))
    except (CheckpointError, UsageError, ValueError) as e:
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        task = saved_task(config)
        results, table = task.evaluate_saved(
            model, config, data=data, batch_size=batch_size, device=torch.device(args.device)
        )
    except (ValueError, OSError) as e:  # unreadable held-out shards, labels the task cannot use
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(table, file=sys.stderr)
    print(task.final_json(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
