"""task=classify: a fused classifier fine-tuned on the labels in each
sample's .json, from pretrained encoders (task.init) or from scratch. The
classification library (labels, class weights, metrics, tables) is
train.classify; this is the task the run asks."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import torch

from mm_models.classifier import ClassifierModel, attach_weights, classifier_config
from train import classify as lib
from train import classify_metrics as metrics
from train.config import TaskName
from train.policies import Evaluation
from train.tasks.base import Prediction, Setup, Task

log = logging.getLogger(__name__)


class ClassifyEvaluation(Evaluation):
    """Fine-tuning: classification metrics of the fused classifier on the held-out shards."""

    title = "held-out classification"

    def __init__(self, *, spec, **kw):
        super().__init__(**kw)
        self.spec = spec

    def _evaluate(self, step: int) -> dict:
        from data_pipeline import build_loader

        heldout = build_loader(
            self.cfg.data,
            split="heldout",
            batch_size=self.cfg.trainer.eval_batch_size,
            labels=self.spec,
            sizes=self.sizes,
            modalities=tuple(self.cfg.task.modalities),
        )
        split = metrics.predict_split(self.engine, heldout, device=self.device, dtype=self.dtype)
        results = metrics.classification_metrics(split, self.spec, threshold=self.cfg.task.threshold)
        if self.info.is_main and step != self.cfg.trainer.max_steps:
            log.info("held-out classification at step %d:\n%s", step, metrics.classify_table(results))
        return results

    def _log_extras(self, results: dict, step: int) -> None:
        metrics.log_to_wandb(self.tracker, results, step=step)

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        return metrics.flat_metrics(results, prefix)

    def table(self, results: dict) -> str:
        return metrics.classify_table(results)


def _has_init(cfg) -> bool:
    return cfg.task.init not in ("", "none")


class ClassifyTask(Task):
    name = TaskName.classify.value
    best_metric = "eval/macro_f1"

    def __init__(self):
        self._init: tuple[dict, dict] | None = None  # (weights, training config) of task.init, until built

    def check(self, cfg):
        super().check(cfg)
        lib.check_task(cfg.task)
        lib.data_for_classify(cfg.data)
        if not _has_init(cfg):
            return cfg
        # The model comes with the pretrained weights: its vocabulary and
        # input geometry are the ones to check (on a copy; the run adopts it).
        _, pretrained = lib.read_init(cfg.task.init, peek=True)
        adopted = copy.deepcopy(cfg)
        lib.adopt_pretrained_config(adopted, pretrained, init=cfg.task.init)
        return adopted

    def check_data(self, cfg) -> None:
        lib.check_labels(cfg.data, lib.label_spec(cfg.task))  # reads the first samples' .json

    def prepare(self, cfg, *, trust: bool) -> Setup:
        resolved = {}
        if _has_init(cfg):
            state, pretrained = lib.read_init(cfg.task.init, trust=trust)
            cfg = copy.deepcopy(cfg)
            lib.adopt_pretrained_config(cfg, pretrained, init=cfg.task.init)
            resolved["model"] = dataclasses.asdict(cfg.model)  # what checkpoints and the export rebuild
            self._init = (state, pretrained)
        # A classifier's loaders decode only the modalities it reads.
        return Setup(cfg=cfg, labels=lib.label_spec(cfg.task), modalities=tuple(cfg.task.modalities), resolved=resolved)

    def build_model(self, setup: Setup, *, loader, info, ds_config, build):
        cfg = setup.cfg
        class_weights = lib.resolve_class_weights(cfg.task, loader, setup.labels, is_main=info.is_main)
        classifier = classifier_config(dataclasses.asdict(cfg.task), class_weights=class_weights)
        init, self._init = self._init, None  # the model holds its copy once built

        def make_model():
            model = ClassifierModel(cfg.model, cfg.fusion, classifier)
            if init is not None:
                state, pretrained = init
                attach_weights(model, *lib.init_weights_from(state, pretrained, fusion=cfg.fusion, init=cfg.task.init))
            return model

        model = build(make_model)
        lr_scales = None
        if cfg.task.freeze == "none" and cfg.task.lr_decay < 1.0:
            lr_scales = lib.lr_scales(model, cfg.task.lr_decay)
        if init is not None and info.is_main:
            source = next(m.pretrained_weights[0] for m in model.modules() if hasattr(m, "pretrained_weights"))
            log.info(
                "initialised %d tensors from task.init=%s%s",
                len(source.loaded),
                cfg.task.init,
                f" ({len(source.missing)} kept fresh: {source.missing[:5]}...)" if source.missing else "",
            )
        return model, lr_scales

    def describe(self, setup: Setup) -> str:
        cfg, spec = setup.cfg, setup.labels
        tuning = (
            "linear probe (encoders frozen)"
            if cfg.task.freeze == "encoders"
            else f"full fine-tuning (lr_decay {cfg.task.lr_decay})"
        )
        return (
            f"task classify: {spec.num_classes} classes{' (multi-label)' if spec.multi_label else ''} over "
            f"{'+'.join(cfg.task.modalities)}, fusion {cfg.fusion.name}, head {cfg.task.head}, {tuning}"
        )

    def evaluation(self, setup: Setup, **common) -> Evaluation:
        return ClassifyEvaluation(spec=setup.labels, **common)

    def result(self, results: dict) -> dict:
        return {"task": self.name, "heldout": results}

    def final_json(self, results: dict) -> str:
        return json.dumps(
            {"step": results["step"], "task": self.name, "heldout": metrics.final_summary(results["heldout"])},
            sort_keys=True,
        )

    def evaluate_saved(self, model, config: dict, *, data, batch_size: int, device) -> tuple[dict, str]:
        from omegaconf import OmegaConf

        from data_pipeline import build_loader
        from train.config import TaskConfig

        model.to(device)
        task = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), config.get("task") or {}))
        spec = lib.label_spec(task)
        loader = build_loader(
            data, split="heldout", batch_size=batch_size, labels=spec, modalities=tuple(task.modalities)
        )
        split = metrics.predict_split(model, loader, device=device, dtype=torch.float32)
        heldout = metrics.classification_metrics(split, spec, threshold=task.threshold)
        return {"step": config.get("step"), "task": self.name, "heldout": heldout}, metrics.classify_table(heldout)

    def prediction(self, config: dict) -> Prediction:
        task = config.get("task") or {}
        classes = list(task.get("classes") or [])
        names = classes or [str(c) for c in range(int(task.get("num_classes") or 0))]
        multi_label = bool(task.get("multi_label", False))
        threshold = float(task.get("threshold", 0.5))

        def forward(model, batch: dict) -> dict:
            return {k: v.cpu() for k, v in model.predict(batch).items()}

        def rows(batch: dict, out: dict) -> list[dict]:
            return class_rows(batch, out, names=names, multi_label=multi_label, threshold=threshold)

        from data_pipeline.decode import MODALITIES

        return Prediction(modalities=tuple(task.get("modalities") or MODALITIES), forward=forward, rows=rows)


def class_rows(batch: dict, out: dict, *, names: list[str], multi_label: bool, threshold: float) -> list[dict]:
    """One row per real (non-padding) sample: its class and probabilities,
    or null predictions with "reason": "no_modality" where the sample has
    none of the classifier's modalities."""
    rows = []
    for i, key in enumerate(batch["__key__"]):
        if not key:
            continue
        if not bool(out["valid"][i]):
            empty = {"labels": None, "classes": None} if multi_label else {"label": None, "class": None}
            rows.append({"key": key, **empty, "probs": None, "reason": "no_modality"})
            continue
        probs = out["probs"][i].tolist()
        row = {"key": key}
        if multi_label:
            chosen = [c for c, p in enumerate(probs) if p > threshold]
            row.update(labels=chosen, classes=[names[c] for c in chosen])
        else:
            c = max(range(len(probs)), key=probs.__getitem__)
            row.update(label=c, **{"class": names[c]})
        row["probs"] = [round(p, 6) for p in probs]
        rows.append(row)
    return rows
