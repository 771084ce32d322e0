"""task=pretrain: contrastive (+ fused) pretraining on image-audio-text
tuples, evaluated by held-out retrieval and zero-shot classification."""

from __future__ import annotations

import json

from mm_models import PretrainModel
from train.config import TaskName
from train.distributed import feature_gather
from train.heldout import eval_metrics, evaluate_heldout, results_table
from train.policies import Evaluation
from train.tables import retrieval_table
from train.tasks.base import Setup, Task


class RetrievalEvaluation(Evaluation):
    """Pretraining: cross-modal retrieval (and the fused metrics) on the held-out shards."""

    title = "held-out retrieval"

    def _evaluate(self, step: int) -> dict:
        results = evaluate_heldout(
            self.engine,
            data=self.cfg.data,
            batch_size=self.cfg.trainer.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            keep_split=True,
            sizes=self.sizes,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self._split = results.pop("split")
        return results

    def _log_extras(self, results: dict, step: int) -> None:
        if self.cfg.logger.table_rows > 0:
            table = retrieval_table(self._split, data=self.cfg.data, rows=self.cfg.logger.table_rows)
            self.tracker.log_table("eval/retrieval_samples", table, step=step)

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        return eval_metrics(results, prefix)

    def table(self, results: dict) -> str:
        return results_table(results)


class PretrainTask(Task):
    name = TaskName.pretrain.value
    best_metric = "eval/image_text/R@1"
    contrastive = True

    def build_model(self, setup: Setup, *, loader, info, ds_config, build):
        cfg = setup.cfg
        return build(lambda: PretrainModel(cfg.model, cfg.fusion, cfg.objective, gather=feature_gather(info))), None

    def evaluation(self, setup: Setup, **common) -> Evaluation:
        return RetrievalEvaluation(**common)

    def final_json(self, results: dict) -> str:
        """Held-out R@k and chance per pair, and zero-shot accuracy and chance
        per modality where the data has class labels."""

        def rounded(r: dict, prefix: str) -> dict:
            return {
                k: (round(v, 4) if k.startswith(prefix) else v)
                for k, v in r.items()
                if k.startswith(prefix) or k in ("n", "classes")
            } | {"chance": {k: round(v, 5) for k, v in r["chance"].items()}}

        heldout = results["heldout"]
        out = {"step": results["step"], "heldout": {p: rounded(r, "R@") for p, r in heldout["retrieval"].items()}}
        if heldout["zero_shot"]:
            out["zero_shot"] = {m: rounded(r, "top") for m, r in heldout["zero_shot"].items()}
        if heldout.get("matching"):
            out["matching"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in heldout["matching"].items()}
        return json.dumps(out, sort_keys=True)

    def evaluate_saved(self, model, config: dict, *, data, batch_size: int, device) -> tuple[dict, str]:
        import torch

        model.to(device)
        heldout = evaluate_heldout(model, data=data, batch_size=batch_size, device=device, dtype=torch.float32)
        return {"step": config.get("step"), "heldout": heldout}, results_table(heldout)
