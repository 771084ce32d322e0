"""train.predict's throughput against the bare model forward, in one run.

Both see the same samples: the model alone runs predict() over batches
decoded beforehand and held in memory (its ceiling); train.predict reads
the shards, decodes them in its workers, predicts and writes the rows. The
ratio says what the pipeline costs on top of the model.

    python benchmarks/predict_throughput.py [--model small] [--shards data/demo/heldout] [--batch-size 64]
                                            [--repeats 5] [--threads N]

train.predict runs --repeats times, each between two runs of the model
alone, and is compared with their mean (the machine's speed drifts); the
median ratio is reported, with the smallest and largest, and the data
workers' CPU time per sample (on a machine without a GPU, time the model's
cores spend decoding). The last line is JSON: {"predict_sps": …,
"model_sps": …, "ratio": …, "ratio_min_max": [...], "worker_cpu_ms_per_sample": …, ...}.
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
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    import mm_models
    from data_pipeline import DataConfig, build_loader
    from data_pipeline.sources import expand_shards
    from train.config import CONF_DIR
    from train.predict import PredictArgs, predict

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

        def model_alone() -> float:
            with torch.no_grad():
                t = time.perf_counter()
                for b in batches:
                    model.predict(b)
                return time.perf_counter() - t

        # This machine's speed drifts by tens of percent within a minute, so
        # every train.predict run is bracketed by a model-alone run before and
        # after it, and compared with their mean.
        runs = []
        before = model_alone()
        for repeat in range(args.repeats):
            workers_cpu = children_cpu_s()
            t = time.perf_counter()
            summary = predict(
                PredictArgs(
                    checkpoint=str(export),
                    shards=args.shards,
                    out=str(tmp / f"pred{repeat}"),
                    batch_size=args.batch_size,
                ),
                [],
            )
            predict_s = time.perf_counter() - t
            # The data workers have exited (and been waited for) by now.
            workers_cpu = children_cpu_s() - workers_cpu
            after = model_alone()
            model_s = (before + after) / 2
            before = after
            if summary["rows"] != n:
                raise SystemExit(f"train.predict wrote {summary['rows']} rows for {n} samples")
            runs.append(
                {
                    "model_sps": n / model_s,
                    "predict_sps": n / predict_s,
                    "ratio": model_s / predict_s,
                    "worker_ms": 1000 * workers_cpu / n,
                }
            )
            print(
                f"run {repeat + 1}: model alone {n / model_s:6.1f}/s (mean of the runs before and after), "
                f"train.predict {n / predict_s:6.1f}/s, ratio {model_s / predict_s:.3f}, "
                f"data workers' CPU {1000 * workers_cpu / n:.2f} ms/sample",
                flush=True,
            )
    median = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    model_sps, predict_sps = median["model_sps"], median["predict_sps"]
    spread = [round(min(r["ratio"] for r in runs), 3), round(max(r["ratio"] for r in runs), 3)]
    print(
        f"model={args.model}, {n} samples, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"data.num_workers=auto, CPU flags: {cpu_flags_line()}"
    )
    print(f"model forward alone:  {model_sps:8.1f} samples/s")
    print(f"train.predict:        {predict_sps:8.1f} samples/s (load, read, decode, predict, write)")
    worker_ms = sorted(r["worker_ms"] for r in runs)[len(runs) // 2]
    print(f"data workers' CPU:    {worker_ms:8.2f} ms/sample (median), on the cores the model uses")
    print(
        json.dumps(
            {
                "predict_sps": round(predict_sps, 1),
                "model_sps": round(model_sps, 1),
                "ratio": round(median["ratio"], 3),
                "ratio_min_max": spread,
                "worker_cpu_ms_per_sample": round(worker_ms, 2),
                "repeats": len(runs),
                "threads": torch.get_num_threads(),
                "model": args.model,
                "samples": n,
            }
        )
    )


if __name__ == "__main__":
    main()
