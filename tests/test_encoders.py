"""The encoder families (model.<modality>.arch): every arch with every fusion
and objective, absent modalities, locked towers, activation checkpointing,
FLOP counting and the config errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import saved_activation_bytes
from torch.utils.flop_counter import FlopCounterMode

from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
from mm_models.encoders import arch_name
from mm_models.flops import flops_per_sample

ARCHS = [  # (image, audio, text)
    ("cnn", "cnn", "rnn"),
    ("conv_transformer", "vit_conv", "transformer"),
    ("vit", "cnn", "rnn"),
]


def config(image: str, audio: str, text: str, *, text_options: dict | None = None) -> ModelConfig:
    enc = dict(width=32, depth=2, heads=2, patch_size=8)
    return ModelConfig(
        embed_dim=16,
        image=EncoderConfig(arch=image, **enc),
        audio=EncoderConfig(arch=audio, **enc),
        text=EncoderConfig(arch=text, **{**enc, **(text_options or {})}),
        image_size=32,
        n_mels=16,
        audio_frames=32,
        max_text_len=12,
    )


def batch(cfg: ModelConfig, b: int = 4, *, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(b, cfg.max_text_len, dtype=torch.bool)
    pad[1:, 6:] = True
    out = {
        "image": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
        "audio": torch.randn(b, cfg.n_mels, cfg.audio_frames, generator=g),
        "text": torch.randint(4, 200, (b, cfg.max_text_len), generator=g),
        "text_pad": pad,
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
    }
    out["image_mask"][0] = False
    out["audio_mask"][1] = False
    out["text_mask"][2] = False
    out["text_pad"][2] = True  # an absent caption is all padding
    return out


@pytest.mark.parametrize("archs", ARCHS, ids="-".join)
@pytest.mark.parametrize(
    "fusion,objective",
    [
        ("none", {}),
        ("concat", {"matching_weight": 1.0}),
        ("weighted_sum", {"matching_weight": 1.0}),
        ("attention", {"matching_weight": 1.0, "masked_text_weight": 1.0}),
    ],
)
def test_every_arch_trains_with_every_fusion(archs, fusion, objective):
    cfg = config(*archs)
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(name=fusion, width=32, heads=2), ObjectiveConfig(**objective))
    model.init_weights()
    out = model(batch(cfg))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for m in ("image", "audio", "text"):
        grads = [p.grad for p in model.model.encoders[m].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), m
        assert any(g.abs().sum() > 0 for g in grads), f"{m} encoder got no gradient"
    if fusion != "none":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())


@pytest.mark.parametrize("archs", ARCHS, ids="-".join)
def test_outputs_have_the_configured_width_and_ignore_padding(archs):
    cfg = config(*archs)
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    model.eval()
    x = batch(cfg)
    features = model.model(x)
    for f in features.values():
        assert f["pooled"].shape == (4, 32) and f["embed"].shape == (4, 16) and f["tokens"].shape[-1] == 32
    # Changing the ids under the padding changes no present caption's embedding.
    y = dict(x, text=x["text"].masked_fill(x["text_pad"], 77))
    present = x["text_mask"]
    torch.testing.assert_close(model.model(y)["text"]["embed"][present], features["text"]["embed"][present])


def test_rnn_padding_never_reaches_the_recurrence():
    cfg = config("cnn", "cnn", "rnn", text_options={"rnn_cell": "lstm"})
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    model.eval()
    enc = model.model.encoders["text"]
    ids = torch.randint(4, 200, (1, 12))
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, 5:] = True
    short = enc(ids[:, :5], pad[:, :5])
    padded = enc(ids, pad)
    torch.testing.assert_close(padded["pooled"], short["pooled"])
    assert padded["tokens"][0, 5:].abs().sum() == 0


def test_unknown_or_unsuitable_arch_names_the_choices():
    with pytest.raises(ValueError, match=r"model\.text\.arch='cnn'.*\['hf', 'rnn', 'transformer'\]"):
        PretrainModel(config("cnn", "cnn", "cnn"), FusionConfig(), ObjectiveConfig())
    with pytest.raises(ValueError, match=r"model\.image\.arch='resnet'"):
        arch_name(config("resnet", "cnn", "rnn"), "image")
    with pytest.raises(ValueError, match="power of two"):
        PretrainModel(
            replace(config("cnn", "cnn", "rnn"), image=EncoderConfig(arch="cnn", patch_size=6)),
            FusionConfig(),
            ObjectiveConfig(),
        )


def test_conv_stem_refuses_sizes_the_patch_does_not_divide():
    cfg = config("conv_transformer", "cnn", "rnn")
    cfg.image_size = 36
    with pytest.raises(ValueError, match=r"data\.image_size \(36\) to be a multiple of model\.image\.patch_size"):
        PretrainModel(cfg, FusionConfig(), ObjectiveConfig())


def test_a_locked_tower_counts_its_forward_only():
    for archs in ARCHS:
        cfg = config(*archs)
        trained = flops_per_sample(cfg)
        for m in ("image", "audio"):
            getattr(cfg, m).freeze = True
        locked = flops_per_sample(cfg)
        assert 0 < locked < trained


def test_frozen_tower_keeps_its_weights_and_eval_mode():
    cfg = config("cnn", "cnn", "rnn")
    cfg.image.freeze = True
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    image = model.model.encoders["image"]
    trainable = {n for n, p in image.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight"}
    assert not image.training  # from construction on: a loop may never call train()
    before = {n: p.detach().clone() for n, p in image.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not image.training and model.model.encoders["audio"].training
    model(batch(cfg))["loss"].backward()
    opt.step()
    for n, p in image.named_parameters():
        assert torch.equal(p, before[n]) == (n != "proj.weight"), n


def test_cnn_activation_checkpointing_keeps_fewer_activations():
    cfg = config("cnn", "cnn", "rnn")
    torch.manual_seed(0)
    plain = PretrainModel(cfg, FusionConfig(), ObjectiveConfig()).model.encoders["image"]
    cfg.image.activation_checkpointing = True
    torch.manual_seed(0)
    ckpt = PretrainModel(cfg, FusionConfig(), ObjectiveConfig()).model.encoders["image"]
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    assert saved_activation_bytes(ckpt, x) < 0.6 * saved_activation_bytes(plain, x)
    # Same values and gradients either way.
    a, b = plain(x)["embed"], ckpt(x)["embed"]
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize("archs", ARCHS, ids="-".join)
def test_flops_match_a_counted_forward_and_backward(archs):
    cfg = config(*archs)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    x = batch(cfg, 3)
    x["text_pad"][:] = False  # the count assumes every text position is computed
    for k in ("image_mask", "audio_mask", "text_mask"):
        x[k][:] = True
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)["loss"].backward()
    ratio = flops_per_sample(cfg) * 3 / counter.get_total_flops()
    # The first layer needs no gradient of its input, so the counted backward is a little cheaper.
    assert 0.95 < ratio < 1.2, ratio


def test_token_dropout_keeps_a_random_subset_in_training_only():
    from mm_models.encoders import set_token_dropout

    cfg = config("vit", "vit", "transformer")
    cfg.image.token_dropout = 0.5
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    encoder = model.model.encoders["image"]
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    patches = (cfg.image_size // cfg.image.patch_size) ** 2
    model.train()
    dropped = encoder(x)["tokens"]
    assert dropped.shape[1] == round(patches * 0.5)
    again = encoder(x)["tokens"]
    assert not torch.equal(dropped, again)  # another random subset
    model.eval()
    assert encoder(x)["tokens"].shape[1] == patches  # evaluation sees every patch
    model.train()
    set_token_dropout(model, False)  # the final unmasked phase
    assert encoder(x)["tokens"].shape[1] == patches
    set_token_dropout(model, True)
    assert encoder(x)["tokens"].shape[1] == round(patches * 0.5)
    # The loss trains through the kept patches.
    out = model(batch(cfg, 4))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and encoder.embedder.proj.weight.grad.abs().sum() > 0


def test_dropped_tokens_keep_their_order_and_positions():
    from mm_models.encoders import drop_tokens

    tokens = torch.arange(10.0)[None, :, None].expand(3, 10, 2)
    kept = drop_tokens(tokens, 0.3)
    assert kept.shape == (3, 7, 2)
    assert (kept[:, 1:, 0] > kept[:, :-1, 0]).all()  # increasing: original order, no repeats


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.text.token_dropout=0.5", "model.text.token_dropout drops image or audio patches"),
        ("model.image.token_dropout=1.0", "model.image.token_dropout=1.0: give a fraction in"),
        ("model.image.token_dropout=-0.1", "give a fraction in"),
    ],
)
def test_token_dropout_settings_are_checked_at_start(override, message):
    from omegaconf import OmegaConf

    from train.config import compose, validate

    with pytest.raises(ValueError, match=message):
        validate(OmegaConf.to_object(compose([override])))


def test_token_dropout_needs_a_transformer_with_learned_positions():
    from omegaconf import OmegaConf

    from train.config import compose, validate

    with pytest.raises(ValueError, match="arch=cnn has none"):
        validate(OmegaConf.to_object(compose(["experiment=demo", "model.image.token_dropout=0.5"])))
    with pytest.raises(ValueError, match="needs positions=learned"):
        validate(OmegaConf.to_object(compose(["model.audio.token_dropout=0.5", "model.audio.positions=rotary"])))
    validate(OmegaConf.to_object(compose(["experiment=demo", "model.audio.token_dropout=0.5"])))  # fine


def test_token_dropout_lowers_the_counted_training_flops():
    from mm_models.flops import flops_per_sample

    cfg = config("vit", "vit", "transformer")
    full = flops_per_sample(cfg)
    cfg.image.token_dropout = cfg.audio.token_dropout = 0.5
    assert flops_per_sample(cfg) == full  # evaluation and inference: every patch
    assert flops_per_sample(cfg, token_dropout=True) < 0.8 * full
