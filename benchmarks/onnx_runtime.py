"""The ONNX export against torch, in one run: file sizes, samples/s and, on a
trained classifier, what int8 quantization costs in accuracy.

Speed: an untrained classifier of model=NAME reading image, audio and text
(late fusion, 72 classes; speed does not depend on the weights) at the
geometry of conf/data/GEOMETRY.yaml, exported with `train.export`'s ONNX
path (train.onnx_export) and quantized to int8. The same random batches go
through torch eager (model.predict under no_grad), onnxruntime fp32 and
onnxruntime int8, in rounds (each round times the three one after the
other, so the machine's drift hits all three alike); the median of the
rounds' ratios is reported, with the smallest and largest. torch and
onnxruntime get the same number of threads.

Accuracy (--classifier EXPORT --heldout SHARDS): the classifier's graph
and its int8 copy are written to a temporary directory, and the held-out
set (through the loader, with the export's own data config) is predicted
by torch, onnxruntime fp32 and int8: accuracy over the labelled samples,
int8's change against fp32, and how often their top classes agree.

    python benchmarks/onnx_runtime.py [--model small] [--geometry webdataset] [--batch-size 16]
        [--batches 4] [--repeats 5] [--threads N] [--classifier EXPORT --heldout SHARDS]

The last line is JSON: {"cpu_flags", "model", "size_mb": {...}, "sps": {...},
"onnx_vs_torch", "int8_vs_fp32", "int8_vs_torch" (each {"median", "min", "max"}),
"accuracy": {...} or null}. Needs the onnx extra (pip install 'mmpretrain[onnx]').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags_line() -> str:
    from train.engine import cpu_flags

    flags = cpu_flags()
    return " ".join(f for f in FLAGS if f in flags) or "unknown"


def config_of(model_name: str, geometry: str) -> tuple[dict, object]:
    """(an untrained classifier's export config, its data config) at a geometry."""
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig
    from mm_models import FusionConfig, ModelConfig, ObjectiveConfig
    from train.config import CONF_DIR

    data = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DIR / "data" / f"{geometry}.yaml"))
    )
    model = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml"))
    )
    model.image_size, model.n_mels = data.image_size, data.n_mels
    model.audio_frames, model.max_text_len = data.audio_frames, data.max_text_len
    task = {"name": "classify", "num_classes": 72, "modalities": ["image", "audio", "text"]}
    config = {
        "model": dataclasses.asdict(model),
        "fusion": dataclasses.asdict(FusionConfig()),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "task": task,
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k != "sources"},
    }
    return config, data


def make_export(out: Path, config: dict) -> Path:
    from mm_models.io import build_from_config
    from train.export import write_weights

    torch.manual_seed(0)
    model = build_from_config(config)
    model.init_weights()
    path = out / "model.safetensors"
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def speed(args, tmp: Path) -> dict:
    import mm_models
    from serve.onnx_backend import OnnxBackend
    from train.onnx_export import example_batch, export_onnx

    config, _ = config_of(args.model, args.geometry)
    export = make_export(tmp, config)
    t = time.perf_counter()
    written = export_onnx(export, quantize="int8")
    export_s = time.perf_counter() - t
    threads = torch.get_num_threads()
    model = mm_models.load(export)
    fp32 = OnnxBackend.load(written["onnx"], threads=threads)
    int8 = OnnxBackend.load(written["int8"], threads=threads)
    batches = [example_batch(config, args.batch_size, seed=i) for i in range(args.batches)]
    for b in batches:  # every row has every modality, as most requests do
        for m in ("image", "audio", "text"):
            b[f"{m}_mask"][:] = True
    n = args.batch_size * args.batches

    def seconds(fn) -> float:
        t = time.perf_counter()
        for b in batches:
            fn(b)
        return time.perf_counter() - t

    with torch.no_grad():
        runners = {"torch": model.predict, "onnx_fp32": fp32.predict, "onnx_int8": int8.predict}
        for fn in runners.values():
            fn(batches[0])  # warm-up
        rounds = []
        for r in range(args.repeats):
            s = {name: seconds(fn) for name, fn in runners.items()}
            rounds.append(s)
            print(
                f"round {r + 1}: torch {n / s['torch']:.1f}/s, onnxruntime fp32 {n / s['onnx_fp32']:.1f}/s, "
                f"int8 {n / s['onnx_int8']:.1f}/s",
                flush=True,
            )
    sps = {name: round(n / statistics.median(r[name] for r in rounds), 2) for name in runners}
    return {
        "model": args.model,
        "geometry": args.geometry,
        "batch_size": args.batch_size,
        "samples_per_round": n,
        "rounds": args.repeats,
        "threads": threads,
        "export_s": round(export_s, 1),
        "max_difference_at_export": written["max_difference"],
        "size_mb": {
            "safetensors": round(mb(export), 2),
            "onnx_fp32": round(mb(written["onnx"]), 2),
            "onnx_int8": round(mb(written["int8"]), 2),
        },
        "int8_size_ratio": round(mb(written["int8"]) / mb(written["onnx"]), 3),
        "sps": sps,
        "onnx_vs_torch": spread([r["torch"] / r["onnx_fp32"] for r in rounds]),
        "int8_vs_fp32": spread([r["onnx_fp32"] / r["onnx_int8"] for r in rounds]),
        "int8_vs_torch": spread([r["torch"] / r["onnx_int8"] for r in rounds]),
    }


def accuracy(export: Path, batches, tmp: Path) -> dict:
    """Accuracy of torch, onnxruntime fp32 and int8 over the batches' labelled samples."""
    import mm_models
    from serve.onnx_backend import OnnxBackend
    from train.onnx_export import export_onnx

    written = export_onnx(export, tmp / "model.onnx", quantize="int8")
    model, fp32, int8 = mm_models.load(export), OnnxBackend.load(written["onnx"]), OnnxBackend.load(written["int8"])
    hits = {"torch": 0, "onnx_fp32": 0, "onnx_int8": 0}
    n = agree = 0
    worst = 0.0
    for batch in batches:
        with torch.no_grad():
            out = {"torch": model.predict(batch), "onnx_fp32": fp32.predict(batch), "onnx_int8": int8.predict(batch)}
        keep = out["torch"]["valid"] & (batch["label"] >= 0)
        n += int(keep.sum())
        top = {k: o["probs"][keep].argmax(-1) for k, o in out.items()}
        for k in hits:
            hits[k] += int((top[k] == batch["label"][keep]).sum())
        agree += int((top["onnx_int8"] == top["onnx_fp32"]).sum())
        worst = max(worst, float((out["onnx_fp32"]["probs"] - out["torch"]["probs"]).abs().max()))
    acc = {k: round(v / max(n, 1), 4) for k, v in hits.items()}
    return {
        "export": str(export),
        "n": n,
        **acc,
        "int8_change": round(acc["onnx_int8"] - acc["onnx_fp32"], 4),
        "int8_fp32_top1_agreement": round(agree / max(n, 1), 4),
        "fp32_max_prob_difference": worst,
        "size_mb": {"onnx_fp32": round(mb(written["onnx"]), 3), "onnx_int8": round(mb(written["int8"]), 3)},
    }


def heldout_batches(export: Path, shards: str, batch_size: int) -> list:
    from omegaconf import OmegaConf

    from data_pipeline import build_loader
    from data_pipeline.tokenizer import tokenizer_for
    from train.classify import label_spec
    from train.cli import data_config
    from train.config import TaskConfig

    config = json.loads(export.with_suffix(".json").read_text())
    data = data_config(config["data"], [f"data.heldout={shards}"])
    task = config["task"]
    loader = build_loader(
        data,
        split="heldout",
        batch_size=batch_size,
        tokenizer=tokenizer_for(str(export)),
        labels=label_spec(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), task))),
        modalities=tuple(task.get("modalities") or ("image", "audio", "text")),
    )
    return list(loader)


def smoke_batches(export: Path) -> list:
    """Random inputs with random labels (the smoke mode has no trained classifier)."""
    from mm_models.io import read_config
    from train.onnx_export import example_batch

    config = read_config(export)
    batches = [example_batch(config, 5, seed=i) for i in range(2)]
    for i, b in enumerate(batches):
        b["label"] = torch.randint(0, config["task"]["num_classes"], (5,), generator=torch.Generator().manual_seed(i))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="model size for the speed part (conf/model/NAME.yaml)")
    parser.add_argument("--geometry", default="webdataset", help="input sizes: conf/data/NAME.yaml (demo: 32 px ...)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="batches per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (torch, fp32, int8 in each)")
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and onnxruntime (0: every core)")
    parser.add_argument("--classifier", default="", help="a trained classifier export for the accuracy part")
    parser.add_argument("--heldout", default="data/demo/heldout", help="its held-out shards")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, a few batches, in seconds: checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.geometry, args.batch_size, args.batches, args.repeats = "tiny", "demo", 4, 2, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "speed").mkdir()
        result = {"cpu_flags": cpu_flags_line(), **speed(args, tmp / "speed")}
        print(
            f"model={result['model']} ({result['geometry']} geometry), batch {result['batch_size']}, "
            f"{result['threads']} threads: size fp32 {result['size_mb']['onnx_fp32']} MB, "
            f"int8 {result['size_mb']['onnx_int8']} MB ({result['int8_size_ratio']}x); samples/s torch "
            f"{result['sps']['torch']}, onnxruntime fp32 {result['sps']['onnx_fp32']}, "
            f"int8 {result['sps']['onnx_int8']}; "
            f"onnxruntime/torch {result['onnx_vs_torch']['median']}x, int8/fp32 {result['int8_vs_fp32']['median']}x"
        )
        result["accuracy"] = None
        (tmp / "accuracy").mkdir()
        if args.classifier:
            export = Path(args.classifier)
            result["accuracy"] = accuracy(export, heldout_batches(export, args.heldout, 64), tmp / "accuracy")
        elif args.smoke:
            export = Path(tmp / "speed" / "model.safetensors")
            result["accuracy"] = accuracy(export, smoke_batches(export), tmp / "accuracy")
        if result["accuracy"] is not None:
            a = result["accuracy"]
            print(
                f"accuracy over {a['n']} held-out samples: torch {a['torch']}, onnxruntime fp32 {a['onnx_fp32']}, "
                f"int8 {a['onnx_int8']} (change {a['int8_change']:+}); int8/fp32 top-1 agreement "
                f"{a['int8_fp32_top1_agreement']}"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
