"""One call from an export to predictions:

    predictor = Predictor.load("outputs/RUN/export/model.safetensors")
    predictor.classify(image="scan.jpg", text="left knee, lateral view")
    predictor.embed(image=["a.jpg", "b.jpg"])                 # a list is a batch
    predictor.zero_shot(image=img, classes=["cat", "dog"])    # a pretrained model
    predictor.similarity(image="a.jpg", text=["a cat", "a dog"])

Inputs are decoded by the training loader's own code (decode_sample, then
collate with the export's data config), so a file gives the model exactly
the tensors it gave it in training. The model runs behind a backend with
two methods, predict(batch) -> {"probs": B×C, "valid": B} and
embed(batch) -> {modality: B×E or None}: the torch model by default,
runtime="onnx" for serve/onnx_backend.py's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mm_models
from data_pipeline import DataConfig, collate
from data_pipeline.config import AudioFeatures, Mode
from data_pipeline.decode import MODALITIES
from data_pipeline.stream import BadSample, decode_sample
from data_pipeline.tokenizer import tokenizer_for
from mm_models.io import read_config
from serve.inputs import InputError, Limits, audio_bytes, class_names, image_bytes, label, one_line, text_bytes

RUNTIMES = ("torch", "onnx")
# Saved data settings that say where training read its shards, not how a sample decodes.
NOT_DECODING = ("train", "sources", "heldout", "allow_pipe", "require", "cache_dir", "num_workers")


def data_config(saved: dict) -> DataConfig:
    """The decoding settings an export was trained with (its "data" section)."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {k: v for k, v in saved.items() if k in known and k not in NOT_DECODING}
    cfg = DataConfig(**values, num_workers=0)
    cfg.audio_features, cfg.mode = AudioFeatures(cfg.audio_features), Mode(cfg.mode)
    cfg.prompts = list(cfg.prompts)
    return cfg


class TorchBackend:
    """An exported torch model (mm_models.load) behind the backend seam."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.model, self.device = model.eval(), torch.device(device)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> TorchBackend:
        return cls(mm_models.load(path, device=device), device)

    def _moved(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.inference_mode()
    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model.predict(self._moved(batch))
        return {"probs": out["probs"].float().cpu(), "valid": out["valid"].cpu()}

    @torch.inference_mode()
    def embed(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """PretrainModel.embed: unnormalised B×E per modality, NaN rows where a
        sample lacks it, None where no sample has it. A classifier has the
        same encoders (and no embed of its own): the same from them."""
        moved = self._moved(batch)
        if hasattr(self.model, "embed"):
            out = self.model.embed(moved)
        else:
            out = {}
            for m, features in self.model.model(moved).items():
                present = moved[f"{m}_mask"]
                e = features["embed"]
                out[m] = None if not bool(present.any()) else e.masked_fill(~present[:, None], float("nan"))
        return {m: None if e is None else e.float().cpu() for m, e in out.items()}


def load_backend(export: str, *, runtime: str = "torch", device: str = "cpu"):
    if runtime == "torch":
        return TorchBackend.load(export, device=device)
    if runtime == "onnx":
        try:
            from serve.onnx_backend import OnnxBackend
        except ModuleNotFoundError as e:
            if e.name != "serve.onnx_backend":
                raise ValueError(f"runtime=onnx: its backend cannot be imported ({e})") from None
            raise ValueError(
                "runtime=onnx is not available in this install (no serve/onnx_backend.py); use runtime=torch"
            ) from None
        return OnnxBackend.load(export)
    raise ValueError(f"runtime={runtime!r}; choose one of {list(RUNTIMES)}")


class Predictor:
    """An export ready to answer: its backend, config, decoding settings and
    tokenizer, read once. See the module docstring."""

    batch_size = 64  # samples per forward when a caller hands over a longer list

    def __init__(self, backend, *, config: dict, data: DataConfig, tokenizer, limits: Limits | None = None):
        self.backend, self.config, self.data, self.tokenizer = backend, config, data, tokenizer
        self.limits = limits or Limits()
        self.limits.check()
        task = config.get("task") or {}
        self.classifier = isinstance(task, dict) and task.get("name") == "classify"
        if self.classifier:
            names = list(task.get("classes") or [])
            self.classes = names or [str(i) for i in range(int(task.get("num_classes") or 0))]
            self.multi_label = bool(task.get("multi_label", False))
            self.threshold = float(task.get("threshold", 0.5))
            reads = task.get("modalities") or MODALITIES
            self.modalities = tuple(m for m in MODALITIES if m in reads)
        else:
            self.classes, self.multi_label, self.threshold = [], False, 0.5
            self.modalities = MODALITIES
        self._class_embeds: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    @classmethod
    def load(
        cls,
        export: str | os.PathLike,
        device: str = "cpu",
        threads: int = 0,
        *,
        runtime: str = "torch",
        limits: Limits | None = None,
    ) -> Predictor:
        """The export at `export` (a .safetensors with its .json beside it).
        threads: torch's intra-op threads (0: torch's default, every core)."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads={threads!r}: give a whole number >= 0 (0: every core)")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}; choose one of {list(RUNTIMES)}")
        export = str(export)
        if not Path(export).is_file():
            raise FileNotFoundError(f"{export} does not exist (export a model with python -m train.export)")
        if threads:
            torch.set_num_threads(threads)
        config = read_config(export)
        data = data_config(config.get("data") or {})
        tokenizer = tokenizer_for(export)
        backend = load_backend(export, runtime=runtime, device=device)
        return cls(backend, config=config, data=data, tokenizer=tokenizer, limits=limits)

    # -- what the model offers -------------------------------------------------
    def require(self, what: str) -> None:
        """A ValueError unless the model offers `what` (classify or zero-shot)."""
        if what == "classify" and not self.classifier:
            raise InputError(
                "classify: this export is a pretrained model, not a fine-tuned classifier; "
                "use embed, zero-shot or similarity",
                field="model",
            )
        if what == "zero-shot" and self.classifier:
            raise InputError(
                "zero-shot: this export is a fine-tuned classifier; use classify (zero-shot needs a pretrained model)",
                field="model",
            )

    # -- decoding ----------------------------------------------------------------
    def decode(self, image=None, audio=None, text=None, *, index: int | None = None, allowed=None) -> dict:
        """One sample as the loader's workers decode it (decode_sample): uint8
        pixels, a fitted waveform, token ids; None for an absent modality."""
        allowed = self.modalities if allowed is None else allowed
        at = "" if index is None else f"[{index}]"
        given = {m: v for m, v in zip(MODALITIES, (image, audio, text)) if v is not None}
        if not given:
            where = f"sample {index}" if index is not None else "no input"
            raise InputError(f"{where}: give at least one of {', '.join(f'{m}=' for m in allowed)}")
        raw, names = {"__key__": f"input{at}"}, {}
        for m, value in given.items():
            field = f"{m}{at}"
            names[m] = field if m == "text" else label(field, value)
            if m not in allowed:
                raise InputError(
                    f"{names[m]}: this model does not read {m} here (it reads {', '.join(allowed)})", field=m
                )
            if m == "image":
                raw["jpg"] = image_bytes(value, self.limits, field=field)
            elif m == "audio":
                raw["wav"] = audio_bytes(
                    value,
                    self.limits,
                    sample_rate=self.data.sample_rate,
                    window=self.data.audio_samples,
                    field=field,
                )
            else:
                raw["txt"] = text_bytes(value, self.limits, field=field)
        try:
            return decode_sample(raw, cfg=self.data, tokenizer=self.tokenizer, modalities=MODALITIES)
        except BadSample as e:
            m = {"bad_image": "image", "bad_audio": "audio"}.get(e.reason, "text")
            what = {"image": "not a decodable image", "audio": "not a decodable sound"}.get(m, "unusable text")
            if e.reason == "empty_text":
                what = "empty text"
            detail = f" ({one_line(e.detail)})" if e.detail else ""
            raise InputError(f"{names.get(m, m)}: {what}{detail}", field=m) from None

    def decode_all(self, image=None, audio=None, text=None, *, allowed=None) -> tuple[list[dict], bool]:
        """(decoded samples, whether the inputs were a batch): a list in any
        modality makes a batch, and then every given modality is a list of
        the same length (None for a sample that lacks it)."""
        given = {m: v for m, v in zip(MODALITIES, (image, audio, text)) if v is not None}
        lists = {m: v for m, v in given.items() if isinstance(v, list)}
        if not lists:
            return [self.decode(**given, allowed=allowed)], False
        if len(lists) != len(given):
            single = sorted(set(given) - set(lists))
            raise InputError(
                f"{', '.join(single)}: a single input beside a batch; give every modality as a list of one length"
            )
        lengths = {len(v) for v in lists.values()}
        if len(lengths) > 1:
            raise InputError(
                f"batch: lists of different lengths ({', '.join(f'{m}: {len(v)}' for m, v in lists.items())})"
            )
        n = lengths.pop()
        if n == 0:
            raise InputError("batch: an empty list")
        return [self.decode(**{m: v[i] for m, v in lists.items()}, index=i, allowed=allowed) for i in range(n)], True

    def batch(self, image=None, audio=None, text=None) -> dict:
        """The model's batch for these inputs, as the loader collates it
        (one row per sample, no padding rows)."""
        samples, _ = self.decode_all(image=image, audio=audio, text=text)
        return self.collate(samples)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples, cfg=self.data, pad_id=self.tokenizer.pad_id)

    def _chunks(self, samples: list[dict]):
        for i in range(0, len(samples), self.batch_size):
            yield self.collate(samples[i : i + self.batch_size])

    # -- classify ------------------------------------------------------------
    def classify(self, image=None, audio=None, text=None, top_k: int = 5):
        """A classifier's classes for a sample: {"classes": [{"name", "index",
        "probability"}, ...], "missing": [modalities it reads that the sample
        lacks]}; the top_k most probable (single-label), or every class over
        the threshold (multi-label), most probable first. A list per sample
        for a batch."""
        self.require("classify")
        top_k = check_top_k(top_k)
        samples, batched = self.decode_all(image=image, audio=audio, text=text)
        out = self.classify_samples(samples, [top_k] * len(samples))
        return out if batched else out[0]

    def classify_samples(self, samples: list[dict], top_ks: list[int]) -> list[dict]:
        """classify() of decoded samples, one forward per batch_size of them."""
        probs, valid = [], []
        for batch in self._chunks(samples):
            out = self.backend.predict(batch)
            probs.append(np.asarray(out["probs"], dtype=np.float32))
            valid.append(np.asarray(out["valid"], dtype=bool))
        p, v = np.concatenate(probs), np.concatenate(valid)
        results = []
        for i, s in enumerate(samples):
            missing = [m for m in self.modalities if s[m] is None]
            if not v[i]:
                results.append({"classes": [], "missing": missing})
                continue
            if self.multi_label:
                chosen = [c for c in np.argsort(-p[i], kind="stable") if p[i][c] > self.threshold]
            else:
                chosen = list(np.argsort(-p[i], kind="stable")[: top_ks[i]])
            classes = [{"name": self.classes[c], "index": int(c), "probability": float(p[i][c])} for c in chosen]
            results.append({"classes": classes, "missing": missing})
        return results

    # -- embeddings ----------------------------------------------------------------
    def embed(self, image=None, audio=None, text=None):
        """Unit-length embeddings in the shared space: {modality: float32
        vector, or None where the sample lacks it} (a list for a batch)."""
        samples, batched = self.decode_all(image=image, audio=audio, text=text)
        out = self.embed_samples(samples)
        return out if batched else out[0]

    def embed_samples(self, samples: list[dict]) -> list[dict[str, np.ndarray | None]]:
        rows: list[dict] = []
        for batch in self._chunks(samples):
            out = self.backend.embed(batch)
            n = len(batch["__key__"])
            unit = {
                m: None if out.get(m) is None else F.normalize(torch.as_tensor(out[m]).float(), dim=-1).numpy()
                for m in self.modalities
            }
            for i in range(n):
                rows.append(
                    {m: None if e is None or not bool(batch[f"{m}_mask"][i]) else e[i].copy() for m, e in unit.items()}
                )
        return rows

    # -- zero-shot -------------------------------------------------------------
    def zero_shot(self, image=None, audio=None, classes=(), top_k: int | None = None):
        """A pretrained model's scores of each class for a sample's image and
        audio: {"image": [{"name", "score"}, ...] best first, "audio": ...}
        (None for a modality the sample lacks). A class is the mean text
        embedding of the export's prompts (data.prompts, "{}" replaced by
        its name), as training's zero-shot evaluation scores it; the score
        is the cosine similarity."""
        self.require("zero-shot")
        names = class_names(classes, self.limits)
        top_k = None if top_k is None else check_top_k(top_k)
        samples, batched = self.decode_all(image=image, audio=audio, allowed=("image", "audio"))
        out = [self.scores(e, names, top_k) for e in self.embed_samples(samples)]
        return out if batched else out[0]

    def class_embeddings(self, names: list[str]) -> torch.Tensor:
        """C×E unit vectors: per class, the normalised mean of its prompts'
        text embeddings (train.heldout.class_embeddings). The last 32 sets
        of classes asked for are kept."""
        key = tuple(names)
        cached = self._class_embeds.get(key)
        if cached is not None:
            self._class_embeds.move_to_end(key)
            return cached
        prompts = self.data.prompts
        texts = [p.format(name) for name in names for p in prompts]
        samples = [
            {
                "__key__": "prompt",
                "image": None,
                "audio": None,
                "text": self.tokenizer.encode(t, max_len=self.data.max_text_len),
            }
            for t in texts
        ]
        chunks = [
            F.normalize(torch.as_tensor(self.backend.embed(b)["text"]).float(), dim=-1) for b in self._chunks(samples)
        ]
        per_prompt = torch.cat(chunks).view(len(names), len(prompts), -1)
        embeds = F.normalize(per_prompt.mean(dim=1), dim=-1)
        self._class_embeds[key] = embeds
        if len(self._class_embeds) > 32:
            self._class_embeds.popitem(last=False)
        return embeds

    def scores(self, embeds: dict, names: list[str], top_k: int | None = None) -> dict:
        """zero_shot's answer for one sample's unit embeddings."""
        classes = self.class_embeddings(names).numpy()
        out: dict[str, list | None] = {}
        for m in ("image", "audio"):
            e = embeds.get(m)
            if e is None:
                out[m] = None
                continue
            s = classes @ e
            order = np.argsort(-s, kind="stable")[: top_k or len(names)]
            out[m] = [{"name": names[c], "score": float(s[c])} for c in order]
        return out

    # -- similarity ---------------------------------------------------------------
    def similarity(self, image=None, audio=None, text=None) -> dict:
        """Cosine similarities between the embeddings of two or three
        modalities, each embedded on its own: {"image-audio": ..., "image-text":
        ..., "audio-text": ...} for the pairs given; a float between two
        single inputs, else an array with a row per input of the first
        modality and a column per input of the second."""
        given = {m: v for m, v in zip(MODALITIES, (image, audio, text)) if v is not None}
        if len(given) < 2:
            raise InputError("similarity: give inputs of at least two modalities")
        embeds = {}
        for m, value in given.items():
            items = value if isinstance(value, list) else [value]
            if not items:
                raise InputError(f"{m}: an empty list")
            samples = [self.decode(**{m: v}, index=i if isinstance(value, list) else None) for i, v in enumerate(items)]
            embeds[m] = np.stack([row[m] for row in self.embed_samples(samples)])
        out = {}
        for a, b in itertools.combinations(MODALITIES, 2):
            if a in embeds and b in embeds:
                s = embeds[a] @ embeds[b].T
                single = not isinstance(given[a], list) and not isinstance(given[b], list)
                out[f"{a}-{b}"] = float(s[0, 0]) if single else s
        return out


def check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError(f"top_k={top_k!r}: give a whole number >= 1", field="top_k")
    return int(top_k)
