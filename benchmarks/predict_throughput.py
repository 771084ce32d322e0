"""train.predict's throughput against the bare model forward, in one run.

All see the same samples. The model alone runs predict() over batches
decoded beforehand and held in memory, two ways: one batch at a time on
every thread (the plain forward loop: `ratio` is train.predict against it),
and the way train.predict runs its forwards, `forwards` batches at once on
a CPU (`pipeline_ratio`: what reading, decoding and writing cost on top of
the same forwards). train.predict reads the shards, decodes them in its
workers, predicts and writes the rows.

    python benchmarks/predict_throughput.py [--model small] [--shards data/demo/heldout] [--batch-size 64]
                                            [--repeats 5] [--threads N] [--forwards N]

train.predict runs --repeats times, each between two runs of each model
alone, and is compared with their mean (the machine's speed drifts); the
median ratios are reported, with the smallest and largest, and the data
workers' CPU time per sample (on a machine without a GPU, time the model's
cores spend decoding). The last line is JSON: {"predict_sps": …,
"model_sps": …, "ratio": …, "ratio_min_max": [...], "forwards": …,
"model_sps_same_forwards": …, "pipeline_ratio": …, "worker_cpu_ms_per_sample": …, ...}.
Needs shards: `make demo-data` writes data/demo/heldout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch


def cpu_flags_line() -> str:
    from train.engine import cpu_flags

    flags = cpu_flags()
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return " ".join(keep) or "unknown"


def children_cpu_s() -> float:
    """CPU seconds of this process's exited and waited-for children (the data workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def make_export(out: Path, model_name: str, data) -> Path:
    """An untrained classifier of model=NAME (speed does not depend on the weights)."""
    from omegaconf import OmegaConf

    from mm_models import FusionConfig, ModelConfig, ObjectiveConfig
    from mm_models.classifier import ClassifierModel, classifier_config
    from train.config import CONF_DIR
    from train.export import write_weights

    model_cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml"))
    )
    model_cfg.image_size, model_cfg.n_mels = data.image_size, data.n_mels
    model_cfg.audio_frames, model_cfg.max_text_len = data.audio_frames, data.max_text_len
    task = {"name": "classify", "num_classes": 72, "modalities": ["image", "audio", "text"]}
    torch.manual_seed(0)
    model = ClassifierModel(model_cfg, FusionConfig(), classifier_config(task))
    model.init_weights()
    path = out / "model.safetensors"
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "model": dataclasses.asdict(model_cfg),
                "fusion": dataclasses.asdict(FusionConfig()),
                "objective": dataclasses.asdict(ObjectiveConfig()),
                "task": task,
                "data": dataclasses.asdict(data),
            }
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="model size (conf/model/NAME.yaml)")
    parser.add_argument("--shards", default="data/demo/heldout")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="train.predict runs, each between two model-alone runs; the median ratio is reported",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the model on both sides (0: torch's default, every core). "
        "Fewer than the cores leaves the data worker a core of its own, as on a GPU machine",
    )
    parser.add_argument(
        "--forwards", type=int, default=0, help="train.predict's forwards= (0: its default for this machine)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.repeats, args.batch_size = "tiny", 1, 16
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    import mm_models
    from data_pipeline import DataConfig, build_loader
    from data_pipeline.sources import expand_shards
    from train.config import CONF_DIR
    from train.predict import PredictArgs, forwards_for, in_order, predict

    try:
        expand_shards(args.shards)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{args.shards}: {e}; run `make demo-data` first (or pass --shards)") from None
    data = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DIR / "data" / "demo.yaml"))
    )
    data.heldout = args.shards
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = make_export(tmp, args.model, data)
        os.environ.pop("RANK", None)
        os.environ.pop("WORLD_SIZE", None)

        # The ceiling: the model alone, on batches decoded beforehand.
        model = mm_models.load(export)
        batches = list(build_loader(data, split="heldout", batch_size=args.batch_size))
        n = sum(sum(1 for k in b["__key__"] if k) for b in batches)
        with torch.no_grad():
            model.predict(batches[0])  # warm-up

        threads = torch.get_num_threads()
        forwards = forwards_for(args.forwards, threads=threads, device=torch.device("cpu"), dispatched=False)

        def model_alone(k: int) -> float:
            """Seconds for all batches through the model, k at a time as train.predict runs them."""
            t = time.perf_counter()
            for _ in in_order(((None, b, None) for b in batches), model.predict, forwards=k, threads=threads):
                pass
            return time.perf_counter() - t

        def both() -> tuple[float, float]:
            return model_alone(1), model_alone(forwards)

        # This machine's speed drifts by tens of percent within a minute, so
        # every train.predict run is bracketed by model-alone runs before and
        # after it, and compared with their mean.
        runs = []
        before = both()
        for repeat in range(args.repeats):
            workers_cpu = children_cpu_s()
            t = time.perf_counter()
            summary = predict(
                PredictArgs(
                    checkpoint=str(export),
                    shards=args.shards,
                    out=str(tmp / f"pred{repeat}"),
                    batch_size=args.batch_size,
                    forwards=forwards,
                ),
                [],
            )
            predict_s = time.perf_counter() - t
            # The data workers have exited (and been waited for) by now.
            workers_cpu = children_cpu_s() - workers_cpu
            after = both()
            model_s, same_s = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            before = after
            if summary["rows"] != n:
                raise SystemExit(f"train.predict wrote {summary['rows']} rows for {n} samples")
            runs.append(
                {
                    "model_sps": n / model_s,
                    "same_sps": n / same_s,
                    "predict_sps": n / predict_s,
                    "ratio": model_s / predict_s,
                    "pipeline_ratio": same_s / predict_s,
                    "worker_ms": 1000 * workers_cpu / n,
                }
            )
            print(
                f"run {repeat + 1}: model alone {n / model_s:6.1f}/s, forwards={forwards} {n / same_s:6.1f}/s "
                f"(means of the runs before and after), train.predict {n / predict_s:6.1f}/s, "
                f"ratio {model_s / predict_s:.3f}, pipeline ratio {same_s / predict_s:.3f}, "
                f"data workers' CPU {1000 * workers_cpu / n:.2f} ms/sample",
                flush=True,
            )

    def median(key: str) -> float:
        return sorted(r[key] for r in runs)[len(runs) // 2]

    def spread(key: str) -> list[float]:
        return [round(min(r[key] for r in runs), 3), round(max(r[key] for r in runs), 3)]

    print(
        f"model={args.model}, {n} samples, batch {args.batch_size}, {threads} threads, "
        f"data.num_workers=auto, CPU flags: {cpu_flags_line()} (medians of {len(runs)} runs)"
    )
    lines = [
        ("model forward alone, one batch at a time", f"{median('model_sps'):8.1f} samples/s"),
        (f"model forward alone, forwards={forwards}", f"{median('same_sps'):8.1f} samples/s"),
        (f"train.predict, forwards={forwards}", f"{median('predict_sps'):8.1f} samples/s (load, read, decode, write)"),
        ("ratio to the one-at-a-time forward", f"{median('ratio'):8.3f} {spread('ratio')}"),
        ("ratio to the same forwards (pipeline)", f"{median('pipeline_ratio'):8.3f} {spread('pipeline_ratio')}"),
        ("data workers' CPU", f"{median('worker_ms'):8.2f} ms/sample, on the model's cores"),
    ]
    for label, value in lines:
        print(f"{label + ':':<42}{value}")
    print(
        json.dumps(
            {
                "predict_sps": round(median("predict_sps"), 1),
                "model_sps": round(median("model_sps"), 1),
                "ratio": round(median("ratio"), 3),
                "ratio_min_max": spread("ratio"),
                "forwards": forwards,
                "model_sps_same_forwards": round(median("same_sps"), 1),
                "pipeline_ratio": round(median("pipeline_ratio"), 3),
                "pipeline_ratio_min_max": spread("pipeline_ratio"),
                "worker_cpu_ms_per_sample": round(median("worker_ms"), 2),
                "repeats": len(runs),
                "threads": threads,
                "model": args.model,
                "samples": n,
            }
        )
    )


if __name__ == "__main__":
    main()
