"""The ONNX runtime of an exported model: onnxruntime runs the graph
`python -m train.export ... format=onnx` wrote (model.onnx, or the int8
model.int8.onnx), with the torch models' two methods:

    backend = OnnxBackend.load("export/model.safetensors")   # its model.onnx
    backend.predict(batch)   # a classifier: {"logits", "probs": B×C, "valid": B bool}
    backend.embed(batch)     # a pretrained model: {"image"|"audio"|"text": B×E or None}

`batch` is the collated batch (data_pipeline.collate); only its tensors
image, image_mask, audio, audio_mask, text, text_mask and text_pad are read.
The outputs match ClassifierModel.predict and PretrainModel.embed: a
modality no sample of the batch has is None, and the row of a sample that
lacks it is NaN.

Imports onnxruntime, numpy and torch only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

METADATA_CONFIG = "mmpretrain.config"
METADATA_KIND = "mmpretrain.kind"
MODALITIES = ("image", "audio", "text")
# onnxruntime's input types -> the numpy dtype it is fed.
_DTYPES = {"tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(int64)": np.int64}


class OnnxBackend:
    """One onnxruntime session over an exported graph; `config` is the
    export's config (model, fusion, objective, task, data; the paths of the
    files bundled with the export, such as its tokenizer, made absolute)."""

    def __init__(self, session, config: dict, kind: str, path: Path):
        self.session, self.config, self.kind, self.path = session, config, kind, path
        self.inputs = {i.name: _DTYPES.get(i.type) for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, path: str | Path, threads: int = 0, *, providers: list[str] | None = None) -> OnnxBackend:
        """path: a .onnx file, or a .safetensors export (its FILE.onnx beside
        it). threads: onnxruntime's intra-op threads (0: its default, one
        per core). providers: onnxruntime execution providers (default CPU)."""
        import onnxruntime as ort

        path = Path(path)
        graph = path.with_suffix(".onnx") if path.suffix == ".safetensors" else path
        if not graph.is_file():
            export = path if path.suffix == ".safetensors" else "EXPORT.safetensors"
            raise FileNotFoundError(
                f"{graph} does not exist (write it with `python -m train.export checkpoint={export} format=onnx`)"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(graph), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ValueError(f"{graph} is not a graph onnxruntime can run: {e}") from None
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_CONFIG not in meta or METADATA_KIND not in meta:
            raise ValueError(
                f"{graph} carries no model config: export it with `python -m train.export ... format=onnx`"
            )
        return cls(
            session, _resolve_bundled(json.loads(meta[METADATA_CONFIG]), graph.parent), meta[METADATA_KIND], graph
        )

    def run(self, batch: dict) -> dict[str, np.ndarray]:
        """The graph's outputs by name, for the collated batch."""
        feeds = {}
        for name, dtype in self.inputs.items():
            value = batch[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            feeds[name] = np.ascontiguousarray(value, dtype=dtype)
        return dict(zip(self.outputs, self.session.run(None, feeds)))

    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"logits", "probs": B×C float32 (softmax, or sigmoids when
        multi-label), "valid": B bool (the sample has one of the task's
        modalities)}, as ClassifierModel.predict."""
        if self.kind != "classifier":
            raise TypeError(f"{self.path} is a pretrained model, not a classifier: use embed(batch)")
        out = self.run(batch)
        return {k: torch.from_numpy(out[k]) for k in ("logits", "probs", "valid")}

    def embed(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """{"image", "audio", "text"}: B×E embeddings (unnormalised), None for a
        modality no sample has, NaN rows where a sample lacks it, as PretrainModel.embed."""
        if self.kind != "pretrain":
            raise TypeError(f"{self.path} is a classifier, not a pretrained model: use predict(batch)")
        out = self.run(batch)
        result: dict[str, torch.Tensor | None] = {}
        for m in MODALITIES:
            present = batch[f"{m}_mask"]
            present = bool(present.any()) if isinstance(present, torch.Tensor) else bool(np.any(present))
            result[m] = torch.from_numpy(out[f"{m}_embed"]) if present else None
        return result


def _resolve_bundled(config: dict, root: Path) -> dict:
    """The paths of files bundled with the export (its tokenizer, Hugging
    Face backbone configs), relative to it in the config, made absolute where
    they exist beside the graph (as mm_models.io.read_config does)."""
    sections = [config.get("model", {}).get(m, {}) for m in MODALITIES]
    for section, key in [*((s, "pretrained") for s in sections), (config.get("data", {}), "tokenizer")]:
        value = section.get(key) if isinstance(section, dict) else None
        if value and value != "byte" and not Path(value).is_absolute() and (root / value).exists():
            section[key] = str(root / value)
    return config
