"""ONNX export of a model export: `python -m train.export ... format=onnx [quantize=int8]`.

Writes, beside FILE.safetensors (or to out=FILE.onnx):

    FILE.onnx        encoders, fusion and head (a classifier) in one graph,
                     with a dynamic batch axis; the export's config in its
                     metadata (METADATA_CONFIG)
    FILE.int8.onnx   with quantize=int8: onnxruntime's dynamic quantization
                     of the same graph (int8 weights of every matrix product)

The graph's inputs are the collated batch's tensors (data_pipeline.collate),
INPUTS, in their dtypes (float32 image and audio, int64 text, bool masks and
text_pad). Its outputs:

    classifier   logits, probs (B×C float32) and valid (B bool), as
                 ClassifierModel.predict gives them
    pretrained   image_embed, audio_embed, text_embed (B×E float32), as
                 PretrainModel.embed gives them: the row of a sample lacking
                 the modality is NaN (the runtime, serve.onnx_backend, turns
                 a modality no row has into None, as embed does)

A classifier's graph leaves out the encoders of modalities outside its
task.modalities (they never change its predictions; their inputs stay
graph inputs, unused). The written graph is run once by onnxruntime against
torch on a batch of random inputs before it replaces anything, and refused
when they differ by more than TOLERANCE.

Needs the `onnx` extra (onnx, onnxscript, onnxruntime); imported only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

INPUTS = ("image", "image_mask", "audio", "audio_mask", "text", "text_mask", "text_pad")
CLASSIFIER_OUTPUTS = ("logits", "probs", "valid")
EMBED_OUTPUTS = ("image_embed", "audio_embed", "text_embed")
METADATA_CONFIG = "mmpretrain.config"  # the export's config JSON (its model.json)
METADATA_KIND = "mmpretrain.kind"  # "classifier" or "pretrain"
OPSET = 18
# Largest |onnxruntime - torch| accepted on the check batch (fp32 graph).
TOLERANCE = 1e-4
# Rows of the batch the graph is traced and checked with; any batch size runs.
TRACE_BATCH = 3
# Above this many bytes of weights, they go to FILE.onnx.data (protobuf's 2 GB limit).
INLINE_LIMIT = 1_800_000_000


class ExportError(Exception):
    """An ONNX export that cannot be made; the message names the cause."""


def onnx_path_for(export: str | Path, out: str | Path | None = None) -> Path:
    """Where the .onnx of an export goes: out, else FILE.onnx beside FILE.safetensors."""
    return Path(out) if out else Path(export).with_suffix(".onnx")


def int8_path_for(onnx_path: str | Path) -> Path:
    """FILE.onnx -> FILE.int8.onnx."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".int8.onnx")


def require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"format=onnx needs {', '.join(missing)}: pip install 'mmpretrain[onnx]'")


class _PrunedEncoders(nn.Module):
    """A classifier's MultimodalModel, less the encoders of modalities outside
    its task: those give zeros of their usual shapes (the classifier masks
    them out whatever they hold)."""

    def __init__(self, model: nn.Module, used: list[str], shapes: dict[str, dict[str, tuple[int, ...]]]):
        super().__init__()
        self.encoders = nn.ModuleDict({m: model.encoders[m] for m in used})
        self.shapes = shapes

    def forward(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for m in ("image", "audio", "text"):
            if m in self.encoders:
                enc = self.encoders[m]
                out[m] = enc(batch[m], pad=batch["text_pad"]) if m == "text" else enc(batch[m])
            else:
                b = batch[m].shape[0]
                out[m] = {k: torch.zeros(b, *shape, device=batch[m].device) for k, shape in self.shapes[m].items()}
        return out


class ClassifierGraph(nn.Module):
    """ClassifierModel.predict with tensors in and out: (logits, probs, valid)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, image_mask, audio, audio_mask, text, text_mask, text_pad):
        batch = dict(zip(INPUTS, (image, image_mask, audio, audio_mask, text, text_mask, text_pad)))
        out = self.model.predict(batch)
        return out["logits"], out["probs"], out["valid"]


class EmbedGraph(nn.Module):
    """PretrainModel.embed's B×E rows, NaN where a sample lacks the modality,
    for every modality whether or not any sample has it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, image_mask, audio, audio_mask, text, text_mask, text_pad):
        batch = dict(zip(INPUTS, (image, image_mask, audio, audio_mask, text, text_mask, text_pad)))
        embeds = self.model.encode(batch)
        return tuple(
            embeds[m].masked_fill(~batch[f"{m}_mask"][:, None], float("nan")) for m in ("image", "audio", "text")
        )


def example_batch(config: dict, batch_size: int = TRACE_BATCH, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the export's geometry (its data config): every
    modality present in some rows and absent in others, captions of several
    lengths, one row with nothing."""
    from train.cli import data_config

    data = data_config(config.get("data", {}), [])
    vocab = int(config.get("model", {}).get("vocab_size", 256))
    g = torch.Generator().manual_seed(seed)
    b, n = batch_size, data.max_text_len
    lengths = torch.randint(2, n + 1, (b,), generator=g)
    text_pad = torch.arange(n)[None, :] >= lengths[:, None]
    rows = torch.arange(b)
    batch = {
        "image": torch.rand(b, 3, data.image_size, data.image_size, generator=g) * 2 - 1,
        "image_mask": rows % 3 != 1,
        "audio": torch.randn(b, data.n_mels, data.audio_frames, generator=g),
        "audio_mask": rows % 3 != 2,
        "text": torch.randint(0, min(vocab, 256), (b, n), generator=g).masked_fill(text_pad, 0),
        "text_mask": rows % 2 == 0,
        "text_pad": text_pad,
    }
    if b > 3:
        for key in ("image_mask", "audio_mask", "text_mask"):
            batch[key][-1] = False
    return batch


def graph_for(model: nn.Module, batch: dict) -> tuple[nn.Module, str, tuple[str, ...]]:
    """(the module to export, its kind, its output names)."""
    from mm_models.classifier import ClassifierModel
    from mm_models.convnets import RNNEncoder
    from mm_models.model import PretrainModel

    if isinstance(model, ClassifierModel):
        used = [m for m in ("image", "audio", "text") if m in model.task.modalities]
        if len(used) < 3:
            with torch.no_grad():
                features = model.model({k: v[:1] for k, v in batch.items()})
            shapes = {m: {k: tuple(t.shape[1:]) for k, t in f.items()} for m, f in features.items()}
            model.model = _PrunedEncoders(model.model, used, shapes)
        graph, kind, outputs = ClassifierGraph(model), "classifier", CLASSIFIER_OUTPUTS
    elif isinstance(model, PretrainModel):
        graph, kind, outputs = EmbedGraph(model), "pretrain", EMBED_OUTPUTS
    else:
        raise ExportError(f"cannot export a {type(model).__name__} to ONNX")
    for name, encoder in model.model.encoders.items():
        if isinstance(encoder, RNNEncoder):
            raise ExportError(
                f"model.{name}.arch=rnn does not export to ONNX (its packed sequences have data-dependent "
                "lengths); the transformer, conv_transformer and cnn encoders do"
            )
    return graph, kind, outputs


def reference_outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """What the graph must give, from the torch model's own predict or embed
    (the example batch has every modality in some row, so embed gives no None)."""
    from mm_models.classifier import ClassifierModel

    if isinstance(model, ClassifierModel):
        out = model.predict(batch)
        return tuple(out[k] for k in CLASSIFIER_OUTPUTS)
    out = model.embed(batch)
    return tuple(out[m] for m in ("image", "audio", "text"))


def run_session(path: str | Path, batch: dict, *, threads: int = 0) -> list:
    """The graph at path run by onnxruntime on batch (the inputs it declares)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    return session.run(None, feeds)


def max_difference(ours: list, theirs: tuple[torch.Tensor, ...]) -> float:
    """Largest |a - b| over the outputs (NaN where both are NaN counts as 0;
    NaN on one side only, or a differing bool, as infinity)."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        a = torch.from_numpy(a)
        if a.shape != b.shape:
            return float("inf")
        if b.dtype == torch.bool:
            if not torch.equal(a, b):
                return float("inf")
            continue
        a, b = a.double(), b.double()
        if not torch.equal(a.isnan(), b.isnan()):
            return float("inf")
        both = ~a.isnan()
        if both.any():
            worst = max(worst, float((a[both] - b[both]).abs().max()))
    return worst


def export_onnx(export: str | Path, out: str | Path | None = None, *, quantize: str = "none") -> dict:
    """Writes the ONNX graph of the export at `export` (FILE.safetensors) to
    out (default FILE.onnx) and, with quantize="int8", FILE.int8.onnx.
    Returns {"onnx": path, "int8": path or None, "kind", "max_difference"}."""
    require_onnx()
    import mm_models
    from mm_models.io import read_config

    export = Path(export)
    if export.suffix != ".safetensors" or not export.is_file():
        raise ExportError(f"{export} is not an export (FILE.safetensors, written by python -m train.export)")
    target = onnx_path_for(export, out)
    if target.suffix != ".onnx":
        raise ExportError(f"out={target} should end in .onnx")
    if quantize not in ("none", "int8"):
        raise ExportError(f"quantize={quantize}; choose none or int8")
    raw = _raw_config(export)
    try:
        model = mm_models.load(export)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None
    batch = example_batch(read_config(export))
    with torch.no_grad():
        expected = reference_outputs(model, batch)  # the model's own methods, before graph_for changes it
        graph, kind, outputs = graph_for(model, batch)
        graph.eval()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".onnx-") as tmp:
        staged = Path(tmp) / target.name
        _export_graph(graph, batch, staged, outputs, metadata={METADATA_CONFIG: raw, METADATA_KIND: kind}, size=size)
        diff = max_difference(run_session(staged, batch), expected)
        if not diff <= TOLERANCE:
            raise ExportError(
                f"the ONNX graph of {export} differs from the torch model by {diff:.3g} "
                f"(more than {TOLERANCE:g}) on a random batch; nothing was written"
            )
        int8 = None
        if quantize == "int8":
            int8 = int8_path_for(target)
            quantize_int8(staged, Path(tmp) / int8.name)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, target.parent / f.name)
            _readable(target.parent / f.name)
    return {"onnx": target, "int8": int8, "kind": kind, "max_difference": diff}


def _raw_config(export: Path) -> str:
    """The export's config as written (bundled paths relative to it), as one JSON string."""
    beside = export.with_suffix(".json")
    if beside.is_file():
        return json.dumps(json.loads(beside.read_text()), sort_keys=True)
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ExportError(f"{beside} is missing and {export} carries no config in its metadata")
    return meta["config"]


def _export_graph(graph: nn.Module, batch: dict, path: Path, outputs, *, metadata: dict, size: int) -> None:
    import io
    import sys

    b = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {k: {0: b} for k in INPUTS}
    args = tuple(batch[k] for k in INPUTS)
    # The exporter reports its progress on stdout (stdout is for our results)
    # and warns about operators of packages we do not use (torchvision's).
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), _quiet("torch.onnx"):
            program = torch.onnx.export(
                graph,
                args,
                input_names=list(INPUTS),
                output_names=list(outputs),
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
            )
    except Exception as e:  # the exporter's failures come in many types
        # Its report (the failing operator, the traceback) on stderr; the error itself in one line.
        print(log.getvalue(), e, sep="\n", file=sys.stderr)
        raise ExportError(
            f"torch.onnx.export could not export this model ({type(e).__name__}; its report is above)"
        ) from None
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=size > INLINE_LIMIT)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights (per tensor), activations
    quantized per batch at run time, for every MatMul and Gemm; the metadata kept."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(""):  # its advice to pre-process the graph, on the root logger: ours is optimized already
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    fp32, int8 = onnx.load(str(src), load_external_data=False), onnx.load(str(dst))
    have = {p.key for p in int8.metadata_props}
    missing = [p for p in fp32.metadata_props if p.key not in have]
    if missing:
        for p in missing:
            int8.metadata_props.add(key=p.key, value=p.value)
        onnx.save(int8, str(dst))


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The logger's warnings (and Python warnings) left out for the duration."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _readable(path: Path) -> None:
    """The mode any file the user writes gets (temporary files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
