"""Parameter counts and analytic training FLOPs of the tri-modal model.

Used to size the presets in conf/model/ and to turn samples/s into MFU
(benchmarks/model_throughput.py). Imports torch only.
"""

from __future__ import annotations

import torch

from mm_models.config import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.encoders import arch_name, build_encoder, kept_tokens, set_token_dropout
from mm_models.model import PretrainModel
from mm_models.objectives import MODALITIES


def parameter_count(model_cfg: ModelConfig) -> int:
    """Parameters of `PretrainModel(model_cfg, FusionConfig(), ObjectiveConfig())`,
    counted on the meta device: no memory is allocated, so even `xl` is instant."""
    with torch.device("meta"):
        model = PretrainModel(model_cfg, FusionConfig(), ObjectiveConfig())
    return sum(p.numel() for p in model.parameters())


def sequence_lengths(model_cfg: ModelConfig) -> dict[str, int]:
    """Tokens each encoder sees per sample: the transformer's, CLS included;
    a CNN's feature-map positions; an RNN's (or hf text model's) text positions."""
    pi, pa = model_cfg.image.patch_size, model_cfg.audio.patch_size
    cls = {m: int(arch_name(model_cfg, m) in ("transformer", "conv_transformer")) for m in MODALITIES}
    return {
        "image": (model_cfg.image_size // pi) ** 2 + cls["image"],
        "audio": (model_cfg.n_mels // pa) * (model_cfg.audio_frames // pa) + cls["audio"],
        "text": model_cfg.max_text_len + cls["text"],
    }


def _encoder_inputs(model_cfg: ModelConfig, modality: str) -> tuple[torch.Tensor, ...]:
    """One sample of a modality's input, no padding, on the current default device."""
    if modality == "image":
        return (torch.zeros(1, 3, model_cfg.image_size, model_cfg.image_size),)
    if modality == "audio":
        return (torch.zeros(1, model_cfg.n_mels, model_cfg.audio_frames),)
    n = model_cfg.max_text_len
    return torch.ones(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.bool)


def counted_encoder_flops(model_cfg: ModelConfig, modality: str, token_dropout: bool = False) -> float:
    """Training FLOPs of one sample through one encoder, counted by torch's
    FlopCounterMode: 3 × the forward pass (forward, plus the gradients of
    activations and weights). For the encoders with no closed formula here:
    CNNs, the convolutional stem, RNNs and Hugging Face backbones.

    Counted on the meta device (no memory, no compute) where the encoder
    allows it; an RNN (packing reads lengths) or a backbone whose code reads
    tensor values is counted on one real sample on the CPU instead."""
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            with torch.device(device), torch.no_grad():
                encoder = build_encoder(model_cfg, modality)
                set_token_dropout(encoder, token_dropout)
                args = _encoder_inputs(model_cfg, modality)
                with FlopCounterMode(display=False) as counter:
                    encoder(*args)
            # A locked tower needs no backward pass at all: its forward only.
            return (1.0 if getattr(model_cfg, modality).freeze else 3.0) * counter.get_total_flops()
        except Exception:  # noqa: BLE001 - only a metric: on the meta device, any failure means "count for real"
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _block_matmul_params(enc: EncoderConfig) -> int:
    """Weights of one block's matmuls: qkv (3W²), out proj (W²), MLP (2·W·hidden).
    Biases and LayerNorm scales are elementwise, not matmuls."""
    w, hidden = enc.width, int(enc.width * enc.mlp_ratio)
    return 4 * w * w + 2 * w * hidden


def flops_per_sample(model_cfg: ModelConfig, token_dropout: bool = False) -> float:
    """Analytic training FLOPs (forward + backward) for one sample, PaLM-style
    (Chowdhery et al. 2022, appendix B), summed over the three encoders:

        per encoder e with width W_e, depth L_e, sequence length T_e (CLS included):
            6 · N_e · T_e                 the blocks' matmul weights, once per token
          + 12 · L_e · H_e · Q_e · T_e²   attention QKᵀ and AV (H_e·Q_e = W_e)
          + 6 · C·p²·W_e · (T_e - 1)      patch-embedding Conv2d: a matmul over the
                                          T_e - 1 patches (C = 3 image, 1 audio)
          + 6 · W_e · E                   projection head, on the CLS token only

        N_e = L_e · (4·W_e² + 2·W_e·hidden_e)  qkv, out proj and MLP weights

    The text token embedding is a table lookup, not a matmul: it counts 0.

    T_image = (image_size/p)² + 1, T_audio = (n_mels/p)·(audio_frames/p) + 1,
    T_text = max_text_len + 1. The factor 6 is 2 (multiply-add) × 3 (forward,
    plus the gradients of the activations and of the weights).

    Left out, as PaLM leaves them out: biases, norms, softmax, GELU and the
    contrastive logits (36·B·E per sample for batch B, which depends on the
    batch and is negligible next to the encoders). Text padding is counted as
    tokens, since the encoder computes them. Fusion modules are not counted
    (this is the late-fusion model, `fusion=none`).
    Encoders other than the transformer are counted by counted_encoder_flops.

    token_dropout: count a training step with model.<m>.token_dropout applied
    (the blocks see the kept patches and CLS; the patch embedding still
    computes every patch).
    """
    seq = sequence_lengths(model_cfg)
    patch_in = {"image": 3, "audio": 1}
    total = 0
    for name in ("image", "audio", "text"):
        if arch_name(model_cfg, name) != "transformer":
            total += counted_encoder_flops(model_cfg, name, token_dropout)
            continue
        enc: EncoderConfig = getattr(model_cfg, name)
        before = total
        patches = seq[name] - 1
        if name in patch_in:
            total += 6 * patch_in[name] * enc.patch_size**2 * enc.width * patches
        t = (kept_tokens(patches, enc.token_dropout) + 1) if token_dropout and enc.token_dropout > 0 else seq[name]
        total += 6 * enc.depth * _block_matmul_params(enc) * t
        total += 12 * enc.depth * enc.width * t * t
        total += 6 * enc.width * model_cfg.embed_dim
        if enc.freeze:
            # A locked tower needs only its forward pass (the projection's
            # backward is negligible): a third of what it would cost to train.
            total -= (2 / 3) * (total - before)
    return float(total)
