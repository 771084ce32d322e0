"""`python -m train [overrides]` (or `torchrun ... -m train [overrides]`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import CONF_DIR, Config, check_override_keys, register_configs
from train.distributed import DistInfo, init_distributed, shared_run_stamp
from train.secrets import redact, redact_files, redact_logging, redact_streams, redact_text
from train.signals import STOPPED_FILE, StopRequest

register_configs()
# DeepSpeed's gathers and reduce-scatters go through torch APIs deprecated
# in 2.13; nothing for users to act on.
for _api in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # ZeRO-3 calls both every step
    warnings.filterwarnings("ignore", message=rf".*{_api}.*deprecated", category=FutureWarning)
_INFO = DistInfo()
_STOP = None
_FROM_ACCELERATE: list[str] = []


# An absolute path: the same under `python -m train` and the mm-train console script.
@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from train.engine import quiet_deepspeed_startup

    quiet_deepspeed_startup()  # before anything imports DeepSpeed
    import torch

    from train.preflight import StartError, check_start

    redact_logging()  # credentials in URLs never reach the console or the run's log files
    sys.argv[:] = [redact_text(a) for a in sys.argv]  # W&B records the command line
    config: Config = OmegaConf.to_object(cfg)
    try:
        # The checks launch.slurm also makes before it submits (train.preflight).
        check_start(
            config,
            world_size=_INFO.world_size,
            cuda=torch.cuda.is_available(),
            run_dir=Path(HydraConfig.get().runtime.output_dir),
        )
    except StartError as e:
        if _INFO.is_main:
            print(f"error: {redact_text(str(e))}", file=sys.stderr)
        sys.exit(2)
    from train.checkpoint import UntrustedCheckpoint
    from train.run import train  # heavy imports after config errors surface
    from train.tasks import task_for
    from train.watchdog import stall_watchdog

    if not _INFO.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    elif _FROM_ACCELERATE:
        logging.getLogger("train").info("from accelerate launch's settings: %s", " ".join(_FROM_ACCELERATE))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    redact_files((run_dir / ".hydra").glob("*.yaml"))  # Hydra saved the config before we ran
    stopped_file = run_dir / STOPPED_FILE
    if _INFO.is_main:
        stopped_file.unlink(missing_ok=True)  # left by an earlier, stopped attempt of this run
    with stall_watchdog(timeout_s=config.trainer.collective_timeout, info=_INFO):
        # `resolved` is what gets written (W&B, checkpoints, the export): secrets redacted.
        resolved = redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        try:
            results = train(config, info=_INFO, run_dir=run_dir, resolved=resolved, stop=_STOP)
        except UntrustedCheckpoint as e:  # refused on purpose: one line, no traceback
            if _INFO.is_main:
                print(f"error: {redact_text(str(e))}", file=sys.stderr)
            sys.exit(2)
    if _INFO.is_main and results.get("stopped"):
        # Checkpointed but not finished: a job script (launch.slurm) requeues on this file.
        stopped_file.write_text(json.dumps({"step": results["step"], "checkpoint": results["checkpoint"]}) + "\n")
    elif _INFO.is_main:
        line = task_for(config.task.name).final_json(results)
        (run_dir / "results.json").write_text(line + "\n")  # the same line, for scripts
        print(line, flush=True)


def main() -> None:
    global _INFO, _FROM_ACCELERATE
    from train.accelerate_env import overrides as accelerate_overrides

    # What reaches stdout and stderr is redacted too: Hydra and Python write an
    # uncaught error's message (which may name a signed URL) straight to stderr.
    redact_streams()
    try:
        # Before Hydra: it would accept "+trainer.max_step=10" and leave it unused.
        given = [a for a in sys.argv[1:] if not a.startswith("-")]
        check_override_keys(given)
        # Under `accelerate launch`: its settings (ZeRO stage, precision, ...)
        # as overrides after the command line's, which may not contradict them.
        _FROM_ACCELERATE = accelerate_overrides(os.environ, given)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {redact_text(str(e))}", file=sys.stderr)
        sys.exit(2)
    sys.argv += _FROM_ACCELERATE
    # Before anything slow: a stop signal from now on is remembered (train.signals).
    global _STOP
    _STOP = StopRequest()
    _INFO = init_distributed()
    # All ranks must agree on the output directory before Hydra creates it.
    os.environ["MM_RUN_STAMP"] = shared_run_stamp()
    _main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
