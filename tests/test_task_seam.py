"""The Task seam, followed as docs/architecture.md's "How to add a task" says:
a task defined here (ToyTask: pretraining's model, evaluated and predicted
its own way) trains, evaluates and predicts through the real entry points,
and nothing else needs to know it exists.

Run as a script, this file registers ToyTask and runs an entry point:
    python tests/test_task_seam.py train OVERRIDES...
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.policies import Evaluation  # noqa: E402
from train.tasks import TASKS, Prediction  # noqa: E402
from train.tasks.pretrain import PretrainTask  # noqa: E402


def text_norms(model, loader, *, device, dtype) -> list[float]:
    norms = []
    with torch.no_grad():
        for batch in loader:
            moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for key, norm in zip(batch["__key__"], model.encode(moved)["text"].float().norm(dim=-1).tolist()):
                if key:
                    norms.append(norm)
    return norms


class ToyEvaluation(Evaluation):
    title = "toy held-out text norms"

    def _evaluate(self, step: int) -> dict:
        from data_pipeline import build_loader

        loader = build_loader(self.cfg.data, split="heldout", batch_size=32, sizes=self.sizes)
        module = getattr(self.engine, "module", self.engine)
        norms = text_norms(module, loader, device=self.device, dtype=self.dtype)
        return {"n": len(norms), "mean_norm": sum(norms) / len(norms)}

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        return {f"{prefix}/toy_n": results["n"], f"{prefix}/toy_mean_norm": results["mean_norm"]}

    def table(self, results: dict) -> str:
        return f"toy: {results['n']} held-out samples, mean text norm {results['mean_norm']:.3f}"


class ToyTask(PretrainTask):
    """Pretraining's model and losses; its own banner, evaluation, result, evaluation of a saved model and rows."""

    best_metric = "eval/toy_n"

    def describe(self, setup) -> str:
        return "task toy: pretraining, judged by held-out text norms"

    def evaluation(self, setup, **common) -> Evaluation:
        return ToyEvaluation(**common)

    def result(self, results: dict) -> dict:
        return {"task": "toy", "heldout": results}

    def final_json(self, results: dict) -> str:
        return json.dumps({"step": results["step"], "task": "toy", "toy_n": results["heldout"]["n"]})

    def evaluate_saved(self, model, config: dict, *, data, batch_size: int, device) -> tuple[dict, str]:
        from data_pipeline import build_loader

        norms = text_norms(
            model.to(device), build_loader(data, split="heldout", batch_size=batch_size), device=device, dtype=None
        )
        heldout = {"n": len(norms), "mean_norm": sum(norms) / len(norms)}
        return {"step": config.get("step"), "task": "toy", "heldout": heldout}, f"toy: {len(norms)} samples"

    def prediction(self, config: dict) -> Prediction:
        def forward(model, batch):
            return {"norm": model.encode(batch)["text"].float().norm(dim=-1).cpu()}

        def rows(batch, out):
            return [{"key": k, "text_norm": round(float(n), 4)} for k, n in zip(batch["__key__"], out["norm"]) if k]

        return Prediction(modalities=("text",), forward=forward, rows=rows)


def run_entry_point(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    from conftest import REPO, clean_env, python

    return subprocess.run(
        [python(), __file__, module, *args],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_a_task_defined_here_trains_evaluates_and_predicts_through_the_entry_points(demo_shards, tmp_path):
    run = tmp_path / "run"
    trained = run_entry_point(
        "train",
        f"hydra.run.dir={run}",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=32",
        "deepspeed.precision=fp32",
        "data.num_workers=0",
        "logger.mode=disabled",
        cwd=tmp_path,
    )
    out = trained.stdout + trained.stderr
    assert trained.returncode == 0, out[-4000:]
    assert "task toy: pretraining, judged by held-out text norms" in out
    assert "toy: 64 held-out samples" in out
    assert json.loads(trained.stdout.strip().splitlines()[-1]) == {"step": 2, "task": "toy", "toy_n": 64}

    export = run / "export" / "model.safetensors"
    evaluated = run_entry_point("train.evaluate", f"checkpoint={export}", cwd=tmp_path)
    assert evaluated.returncode == 0 and evaluated.stdout.strip(), evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == {"step": 2, "task": "toy", "toy_n": 64}

    predicted = run_entry_point(
        "train.predict", f"checkpoint={export}", f"shards={demo_shards['heldout']}", f"out={tmp_path / 'pred'}",
        "data.num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions-rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all(set(r) == {"key", "text_norm"} and r["text_norm"] > 0 for r in rows)


if __name__ == "__main__":
    # The task is registered under pretraining's name: the schema's task.name
    # choices are train.config.TaskName's, which a test cannot extend.
    TASKS["pretrain"] = ToyTask
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
