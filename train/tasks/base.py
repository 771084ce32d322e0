"""The Task seam: what differs between tasks (pretraining, a fused
classifier, whatever comes next), asked of one object chosen once by name
(train.tasks.task_for). After that choice nothing asks which task runs.

A run calls, in order: check (start-up, before anything is built),
prepare (the config the run trains, returned anew), build_model,
describe (the banner line), evaluation (held-out, during and after
training), result and final_json (the end). train.evaluate calls
evaluate_saved and final_json; train.predict calls prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from data_pipeline.decode import MODALITIES


@dataclass
class Setup:
    """What a task hands the run once it has prepared the config."""

    cfg: object  # train.config.Config: the config the run trains (a task may adopt parts of it)
    labels: object = None  # data_pipeline.labels.LabelSpec, where the task reads labels
    modalities: tuple[str, ...] = MODALITIES  # what the loaders decode
    # Sections of the resolved config to replace (what checkpoints and the export rebuild).
    resolved: dict = field(default_factory=dict)


@dataclass
class Prediction:
    """What train.predict runs for a task's model (besides --embed, which any model offers)."""

    modalities: tuple[str, ...]  # what the loader decodes
    forward: Callable  # (model, batch on the device) -> outputs on the CPU
    rows: Callable  # (batch, outputs) -> one row per real sample


class Task:
    """The defaults are pretraining's where one is natural; a task overrides what differs."""

    name: str = ""
    best_metric: str = ""  # logger.best_metric=auto
    contrastive: bool = False  # has contrastive losses (trainer.contrastive_batch applies)

    def check(self, cfg):
        """Start-up checks of the task's settings (StartError-worthy
        ValueErrors naming the key); returns the config the run would train,
        for the checks that follow (the vocabulary, the audio features)."""
        if cfg.trainer.contrastive_batch and not self.contrastive:
            raise ValueError(
                f"trainer.contrastive_batch={cfg.trainer.contrastive_batch} is for pretraining's contrastive "
                f"losses; task={self.name} has none: leave it at 0"
            )
        return cfg

    def check_data(self, cfg) -> None:
        """Checks that read the first training samples (after the shard patterns are known good)."""

    def prepare(self, cfg, *, trust: bool) -> Setup:
        return Setup(cfg=cfg)

    def build_model(self, setup: Setup, *, loader, info, ds_config, build) -> tuple[object, dict | None]:
        """(the model built through `build(make_model)`, layer-wise lr scales or None)."""
        raise NotImplementedError

    def describe(self, setup: Setup) -> str | None:
        """The banner line after the model's, or None."""
        return None

    def evaluation(self, setup: Setup, **common):
        """The train.policies.Evaluation the run calls every eval_every steps and at the end."""
        raise NotImplementedError

    def result(self, results: dict) -> dict:
        """train()'s return beside step and checkpoint: the final held-out results."""
        return {"heldout": results}

    def final_json(self, results: dict) -> str:
        """The last line of a run and of train.evaluate."""
        raise NotImplementedError

    def evaluate_saved(self, model, config: dict, *, data, batch_size: int, device) -> tuple[dict, str]:
        """train.evaluate: (results, their table) of a saved model on data.heldout."""
        raise NotImplementedError

    def prediction(self, config: dict) -> Prediction | None:
        """What train.predict writes without --embed; None: nothing but embeddings."""
        return None


def replace_section(cfg, **sections):
    """A copy of the config with whole sections replaced (the caller's is left as it was)."""
    return dataclasses.replace(cfg, **sections)
