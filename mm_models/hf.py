"""Pretrained Hugging Face transformers backbones as encoders:
`model.<modality>.arch=hf model.<modality>.pretrained=DIR`, where DIR is a
local directory in the `save_pretrained` layout (config.json and weights;
preprocessor_config.json for image normalisation; the tokenizer files for
text). Nothing is fetched from the network.

The backbone is built from its config, then its weights are copied in by
`init_module` one module at a time (PretrainedWeights.load_into), so a ZeRO-3
model built partitioned gathers only one module's parameters at a time, and
`init_weights()` never overwrites pretrained weights with random ones.

transformers is imported here only, and this module only when an encoder's
arch is `hf`: `mm_models` stays importable with torch alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from mm_models.config import ModelConfig

# Audio backbones that read raw waveforms: our audio pipeline gives log-mel spectrograms.
_WAVEFORM_MODELS = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "sew", "wav2vec2-conformer")


class HFError(ValueError):
    """A pretrained directory that cannot serve this modality; the message names the fix."""


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise HFError("arch=hf needs the transformers package: pip install 'transformers>=4.40'") from None
    return transformers


def pretrained_dir(cfg: ModelConfig, modality: str) -> Path:
    spec = getattr(cfg, modality).pretrained
    if not spec:
        raise HFError(f"model.{modality}.arch=hf needs model.{modality}.pretrained=DIR (a save_pretrained directory)")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise HFError(
            f"model.{modality}.pretrained={spec}: no config.json there (expected a directory written "
            "by save_pretrained)"
        )
    return path


class PretrainedWeights:
    """The pretrained tensors of a backbone, by the backbone's own names.

    Read on first use with the library's own loader (`from_pretrained` of
    the backbone's class, on the CPU), so that its renames of legacy weight
    names, prefixes of task models ("resnet.", "bert.") and sharded files
    are handled as the library handles them. First use is init time, after
    any ZeRO-3 partitioned construction: each rank briefly holds one full
    copy of the backbone. A model rebuilt from an export (which carries the
    weights itself) never reads them."""

    def __init__(self, directory: Path, backbone_class: type):
        self.directory = directory
        # A Whisper encoder is loaded as the encoder of a WhisperModel (its
        # weights carry the "encoder." prefix the encoder class alone ignores).
        self.load_class, self.part = (backbone_class, None)
        if backbone_class.__name__ == "WhisperEncoder":
            from transformers import WhisperModel

            self.load_class, self.part = WhisperModel, "encoder"
        self.missing: list[str] = []
        self._state: dict[str, torch.Tensor] | None = None

    def tensor(self, name: str) -> torch.Tensor | None:
        if self._state is None:
            transformers = _require_transformers()
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # a task head's unused weights are expected
            transformers.logging.disable_progress_bar()
            try:
                model, info = self.load_class.from_pretrained(
                    str(self.directory), local_files_only=True, output_loading_info=True
                )
            finally:
                transformers.logging.set_verbosity(verbosity)
                transformers.logging.enable_progress_bar()
            # The library fills what the checkpoint lacks with random values: leave those out, so they
            # keep our own init and are reported (finish_loading).
            absent = {k.removeprefix(f"{self.part}.") for k in info.get("missing_keys", ())}
            if self.part:
                model = getattr(model, self.part)
            self._state = {k: v for k, v in model.state_dict().items() if k not in absent}
        return self._state.get(name)

    def release(self) -> None:
        self._state = None

    @torch.no_grad()
    def load_into(self, module: nn.Module, name: str) -> None:
        """Copies the module's own parameters and buffers (name: its path in the backbone)."""
        skip = module._non_persistent_buffers_set  # recomputed, never saved (position ids and the like)
        own = [
            *module.named_parameters(recurse=False),
            *((n, b) for n, b in module.named_buffers(recurse=False) if n not in skip),
        ]
        for local, t in own:
            full = f"{name}.{local}" if name else local
            value = self.tensor(full)
            if value is None:
                self.missing.append(full)
                if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)):
                    t.data.zero_()  # built without init (no_init_weights): never leave garbage
                continue
            if tuple(value.shape) != tuple(getattr(t, "ds_shape", t.shape)):
                raise HFError(
                    f"{self.directory}: {full} has shape {tuple(value.shape)}, the model expects {tuple(t.shape)}"
                )
            t.data.copy_(value.to(t.dtype))


def _no_init(transformers):
    """The library's switch that skips its weight initialisation at
    construction: under ZeRO-3 the parameters are already partitioned
    (empty) then, and our init_module initialises and loads them instead."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _build_backbone(modality: str, directory: Path) -> tuple[nn.Module, object]:
    transformers = _require_transformers()
    with _no_init(transformers):
        return _construct(transformers, modality, directory)


def _construct(transformers, modality: str, directory: Path) -> tuple[nn.Module, object]:
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    kind = config.model_type
    if kind == "clip":
        config = config.vision_config if modality != "text" else config.text_config
        kind = config.model_type
    if modality == "audio" and kind in _WAVEFORM_MODELS:
        raise HFError(
            f"model.audio.pretrained={directory}: a {kind} model reads raw waveforms, and the audio "
            "pipeline gives log-mel spectrograms; use a spectrogram model (an Audio Spectrogram "
            "Transformer, a Whisper encoder)"
        )
    if kind == "clip_vision_model":
        return transformers.CLIPVisionModel(config), config
    if kind == "clip_text_model":
        return transformers.CLIPTextModel(config), config
    if kind == "whisper":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config), config
    return transformers.AutoModel.from_config(config), config


def check_geometry(modality: str, config, cfg: ModelConfig) -> None:
    """Input sizes the backbone fixes; a mismatch names both values and the data key to set."""
    wanted: dict[str, tuple[int, int]] = {}
    kind = getattr(config, "model_type", "")
    if modality == "image" and kind in ("vit", "clip_vision_model", "deit", "dinov2", "siglip_vision_model"):
        wanted["data.image_size"] = (cfg.image_size, int(config.image_size))
    if modality == "audio" and kind == "audio-spectrogram-transformer":
        wanted["data.n_mels"] = (cfg.n_mels, int(config.num_mel_bins))
        wanted["data.audio_frames"] = (cfg.audio_frames, int(config.max_length))
    if modality == "audio" and kind == "whisper":
        wanted["data.n_mels"] = (cfg.n_mels, int(config.num_mel_bins))
        wanted["data.audio_frames"] = (cfg.audio_frames, 2 * int(config.max_source_positions))
    if modality == "text" and hasattr(config, "max_position_embeddings"):
        if cfg.max_text_len > int(config.max_position_embeddings):
            raise HFError(
                f"data.max_text_len={cfg.max_text_len} exceeds the text backbone's "
                f"max_position_embeddings={config.max_position_embeddings}"
            )
    bad = {k: v for k, v in wanted.items() if v[0] != v[1]}
    if bad:
        fixes = " ".join(f"{k}={want}" for k, (_, want) in bad.items())
        have = ", ".join(f"{k}={have}" for k, (have, _) in bad.items())
        raise HFError(
            f"model.{modality}.arch=hf: the {kind} backbone expects other input geometry ({have}); set {fixes}"
        )


# transformers' feature extractor defaults, where a directory has no preprocessor_config.json.
_AST_MEAN, _AST_STD = -4.2677393, 4.5689974


def audio_input(directory: Path) -> tuple[str, str, dict] | None:
    """What the audio backbone in `directory` was trained to read, as data
    settings: (model type, a description, {data key: value}), or None for a
    backbone without a feature extractor we reproduce. Read from its
    config.json and preprocessor_config.json (transformers' defaults where
    the latter is absent); nothing is imported or built.

    Whisper: data.audio_features=whisper (WhisperFeatureExtractor's log-mel)
    at its sample rate, n_fft and hop. An Audio Spectrogram Transformer:
    data.audio_features=kaldi (ASTFeatureExtractor's Kaldi filterbanks:
    400-sample frames every 160 at 16 kHz) normalised by its mean and twice
    its std, as the extractor does. Both: its mel bins and frames."""
    try:
        config = json.loads((directory / "config.json").read_text())
        path = directory / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise HFError(f"model.audio.pretrained={directory}: cannot read its config ({e})") from None
    kind = config.get("model_type", "")
    if kind == "whisper":
        return (
            kind,
            "Whisper's log-mel (log10, floored 8 below the clip's peak, then (x + 4) / 4)",
            {
                "audio_features": "whisper",
                "sample_rate": int(pre.get("sampling_rate", 16000)),
                "n_fft": int(pre.get("n_fft", 400)),
                "hop_length": int(pre.get("hop_length", 160)),
                "n_mels": int(config.get("num_mel_bins", 80)),
                "audio_frames": 2 * int(config.get("max_source_positions", 1500)),
            },
        )
    if kind == "audio-spectrogram-transformer":
        normalise = pre.get("do_normalize", True)
        return (
            kind,
            "Kaldi filterbanks (25 ms frames every 10 ms at 16 kHz) normalised by its mean and twice its std",
            {
                "audio_features": "kaldi",
                "sample_rate": int(pre.get("sampling_rate", 16000)),
                "n_fft": 400,
                "hop_length": 160,
                "n_mels": int(config.get("num_mel_bins", 128)),
                "audio_frames": int(config.get("max_length", 1024)),
                "log_mel_mean": float(pre.get("mean", _AST_MEAN)) if normalise else 0.0,
                "log_mel_std": 2 * float(pre.get("std", _AST_STD)) if normalise else 1.0,
            },
        )
    return None


def _image_normalisation(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's mean and std (preprocessor_config.json), else 0.5/0.5,
    which leaves our [-1, 1] images as they are."""
    mean, std = [0.5] * 3, [0.5] * 3
    path = directory / "preprocessor_config.json"
    if path.is_file():
        pre = json.loads(path.read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    return torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), torch.tensor(std, dtype=torch.float32).view(
        1, 3, 1, 1
    )


class HFEncoder(nn.Module):
    """A transformers backbone -> tokens (B×N×H), pooled (B×H) -> width W
    (a linear map where H ≠ W) -> the projection into the shared space.

    Inputs, per modality: images in [-1, 1] are renormalised to the
    backbone's mean and std; log-mels (B×M×T) go in as AST's B×T×M or
    Whisper's B×M×T; text ids must come from the backbone's own tokenizer
    (data.tokenizer=DIR), with padding as the attention mask.
    """

    def __init__(self, modality: str, cfg: ModelConfig):
        super().__init__()
        directory = pretrained_dir(cfg, modality)
        self.modality = modality
        self.backbone, config = _build_backbone(modality, directory)
        self.kind = config.model_type
        check_geometry(modality, config, cfg)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or config.hidden_sizes[-1])
        width = getattr(cfg, modality).width
        self.resize = nn.Identity() if hidden == width else nn.Linear(hidden, width)
        # A learned pooler (BERT's or ViT's dense + tanh over [CLS]) is a task
        # head that base-model checkpoints often lack: pool from the tokens
        # instead, and keep it out of training.
        self.learned_pooler = any(n.startswith("pooler.") for n, _ in self.backbone.named_parameters())
        for n, p in self.backbone.named_parameters():
            if n.startswith("pooler."):
                p.requires_grad_(False)
        if getattr(cfg, modality).activation_checkpointing:
            if not getattr(self.backbone, "supports_gradient_checkpointing", False):
                raise HFError(
                    f"model.{modality}.activation_checkpointing: the {self.kind} backbone does not "
                    "support gradient checkpointing"
                )
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)
        mean, std = _image_normalisation(directory)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        weights = PretrainedWeights(directory, type(self.backbone))
        self.weights = [weights]  # a list: not a submodule, not in the state dict
        for name, module in self.backbone.named_modules():
            module.pretrained_weights = (weights, name)

    def finish_loading(self) -> None:
        """After init: warns about tensors the directory did not hold (they keep the backbone's own init)."""
        weights = self.weights[0]
        weights.release()
        if weights.missing:
            warnings.warn(
                f"{weights.directory}: {len(weights.missing)} tensors not in the checkpoint keep their "
                f"initial values: {weights.missing[:5]}",
                stacklevel=2,
            )
            weights.missing.clear()

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.modality == "image":
            pixels = ((x.float() + 1) / 2 - self.pixel_mean) / self.pixel_std
            out = self.backbone(pixel_values=pixels.to(x.dtype))
        elif self.modality == "audio":
            if self.kind == "whisper":
                out = self.backbone(input_features=x)
            else:
                out = self.backbone(input_values=x.transpose(1, 2))
        else:
            keep = ~pad if pad is not None else torch.ones_like(x, dtype=torch.bool)
            keep[:, 0] |= ~keep.any(dim=1)  # an absent caption: one attendable position, never an empty row
            out = self.backbone(input_ids=x, attention_mask=keep.long())
        h = out.last_hidden_state
        if h.dim() == 4:  # a CNN's feature map B×C×h×w
            tokens = h.flatten(2).transpose(1, 2)
        else:
            tokens = h
        pooled = None if self.learned_pooler else getattr(out, "pooler_output", None)
        if pooled is None:
            if self.modality == "text" and pad is not None:
                keep = (~pad).unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
            elif self.learned_pooler:
                pooled = tokens[:, 0]  # the [CLS] token the pooler would have read
            else:
                pooled = tokens.mean(dim=1)
        pooled = pooled.flatten(1)
        tokens, pooled = self.resize(tokens), self.resize(pooled)
        return {"tokens": tokens, "pooled": pooled, "embed": self.proj(pooled)}
