"""Does our system learn as fast as a plain PyTorch script of the same size?

In one run, on the spoken-caption corpus (32 classes of coloured shapes,
captions spoken by espeak-ng; see data_pipeline/spoken.py):

  ours        `torchrun --nproc_per_node=2 -m train` with the model and
              recipe under test (default: model=tiny, ZeRO-2, the default
              optimizer), global batch 128 = 64 micro × 2 ranks;
  reference   a plain PyTorch script in one process, written here on its
              own: ViTs (nn.TransformerEncoder, CLS pooling, PyTorch's
              default init) of model=tiny's size for image and audio, a
              byte transformer of the same size for text, symmetric InfoNCE
              over the three pairs, AdamW at a constant lr of 2e-3, batch 128.

Both read the same shards through the same loader, take the same number of
steps and are evaluated by the same function (train.evaluate.evaluate_heldout):
zero-shot top-1 over the 32 class names with the prompt "a {}" (chance 1/32).

    apt-get install espeak-ng      # once; the corpus is synthesised speech
    python benchmarks/learning_efficiency.py [--steps 400] [--ours model.image.arch=cnn ...]

The last line of output is one JSON object:
{"ours": {"image": ..., "audio": ...}, "reference": {...}, "ratio_min": ...}
where ratio_min is the smaller of ours ÷ reference over image and audio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GLOBAL_BATCH = 128
RANKS = 2


def ensure_corpus(root: Path, *, train: int, heldout: int) -> None:
    """Synthesises and writes the spoken corpus once (about a minute)."""
    if (root / "train" / "index.json").is_file() and (root / "heldout" / "index.json").is_file():
        return
    from data_pipeline.spoken import SpeechUnavailable, require_espeak

    try:
        require_espeak()
    except SpeechUnavailable as e:
        sys.exit(f"learning_efficiency: {e}")
    py = sys.executable
    subprocess.run(
        [
            py,
            "-m",
            "data_pipeline",
            "demo",
            str(root / "raw"),
            "--spoken",
            "--train",
            str(train),
            "--heldout",
            str(heldout),
        ],
        check=True,
        cwd=REPO,
    )
    for split, per_shard in (("train", 500), ("heldout", 250)):
        subprocess.run(
            [
                py,
                "-m",
                "data_pipeline",
                "write",
                str(root / "raw" / f"{split}.jsonl"),
                str(root / split),
                "--max-samples",
                str(per_shard),
            ],
            check=True,
            cwd=REPO,
        )


def data_overrides(root: Path) -> list[str]:
    return ["data=spoken", f"data.train={root / 'train'}", f"data.heldout={root / 'heldout'}"]


def zero_shot(results: dict) -> dict[str, float]:
    return {m: round(results["zero_shot"][m]["top1"], 4) for m in ("image", "audio")}


def run_ours(root: Path, *, steps: int, extra: list[str], out: Path) -> dict[str, float]:
    """Our trainer on RANKS processes; its final JSON line holds the zero-shot figures."""
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        f"--nproc_per_node={RANKS}",
        "-m",
        "train",
        "model=tiny",
        "deepspeed=zero2",
        *data_overrides(root),
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={GLOBAL_BATCH // RANKS}",
        f"trainer.log_every={max(1, steps // 8)}",
        "trainer.eval_batch_size=250",
        "logger.mode=disabled",
        "trainer.export=false",
        f"hydra.run.dir={out}",
        *extra,
    ]
    print("ours:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"learning_efficiency: our training failed (exit {proc.returncode}); see {out}")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    return zero_shot(final)


# -- the reference: plain PyTorch, nothing from mm_models or train's engine ---------------------


def reference_model(model_cfg):
    import torch
    from torch import nn

    def stack(width: int, depth: int, heads: int, mlp_ratio: float) -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    class Tower(nn.Module):
        """Tokens -> [CLS] + learned positions -> transformer -> LayerNorm(CLS) -> projection."""

        def __init__(self, tokenizer: nn.Module, n_tokens: int, enc, embed_dim: int):
            super().__init__()
            self.tokenizer = tokenizer
            self.cls = nn.Parameter(torch.randn(1, 1, enc.width) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, enc.width) * 0.02)
            self.blocks = stack(enc.width, enc.depth, enc.heads, enc.mlp_ratio)
            self.norm = nn.LayerNorm(enc.width)
            self.proj = nn.Linear(enc.width, embed_dim, bias=False)

        def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
            tokens = self.tokenizer(x)
            h = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            h = h + self.pos[:, : h.shape[1]]
            if pad is not None:
                pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
            h = self.blocks(h, src_key_padding_mask=pad)
            return self.proj(self.norm(h[:, 0]))

    class Patches(nn.Module):
        def __init__(self, channels: int, patch: int, width: int):
            super().__init__()
            self.conv = nn.Conv2d(channels, width, patch, stride=patch)

        def forward(self, x):
            if x.dim() == 3:
                x = x.unsqueeze(1)
            return self.conv(x).flatten(2).transpose(1, 2)

    class Reference(nn.Module):
        def __init__(self, c):
            super().__init__()
            pi, pa = c.image.patch_size, c.audio.patch_size
            self.image = Tower(Patches(3, pi, c.image.width), (c.image_size // pi) ** 2, c.image, c.embed_dim)
            self.audio = Tower(
                Patches(1, pa, c.audio.width), (c.n_mels // pa) * (c.audio_frames // pa), c.audio, c.embed_dim
            )
            self.text = Tower(nn.Embedding(c.vocab_size, c.text.width), c.max_text_len, c.text, c.embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def embed(self, batch: dict) -> dict:
            return {
                "image": self.image(batch["image"]),
                "audio": self.audio(batch["audio"]),
                "text": self.text(batch["text"], batch["text_pad"]),
            }

        # What train.evaluate.evaluate_heldout asks of a model: embeddings, and
        # no matching head (its scores are None).
        encode = embed

        def encode_and_match(self, batch: dict) -> tuple[dict, None]:
            return self.embed(batch), None

    return Reference(model_cfg)


def reference_loss(model, batch: dict):
    """Symmetric InfoNCE per modality pair over the samples holding both, averaged over pairs."""
    import torch
    import torch.nn.functional as F

    z = {m: F.normalize(e, dim=-1) for m, e in model.embed(batch).items()}
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    losses = []
    for a, b in (("image", "audio"), ("image", "text"), ("audio", "text")):
        both = batch[f"{a}_mask"] & batch[f"{b}_mask"]
        if both.sum() < 2:
            continue
        logits = scale * z[a][both] @ z[b][both].T
        target = torch.arange(logits.shape[0])
        losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    return torch.stack(losses).mean()


def run_reference(root: Path, *, steps: int, lr: float = 2e-3) -> dict[str, float]:
    import torch
    from omegaconf import OmegaConf

    from data_pipeline import build_loader
    from train.batch import to_device
    from train.config import compose
    from train.heldout import evaluate_heldout

    cfg = OmegaConf.to_object(compose(["model=tiny", *data_overrides(root)]))
    torch.manual_seed(0)
    torch.set_num_threads(RANKS)
    model = reference_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = build_loader(cfg.data, split="train", batch_size=GLOBAL_BATCH)
    batches = iter(loader)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = to_device(next(batches), device=torch.device("cpu"), dtype=torch.float32)
        loss = reference_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 8) == 0 or step == steps:
            print(
                f"reference step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True
            )
    model.eval()
    results = evaluate_heldout(model, data=cfg.data, batch_size=250, device=torch.device("cpu"), dtype=torch.float32)
    return zero_shot(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "spoken")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--heldout-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "learning_efficiency")
    parser.add_argument(
        "--ours",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="extra `python -m train` overrides for our run (e.g. model.image.arch=cnn)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="train ours only (the JSON then has no ratio)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2

    corpus = args.corpus.resolve()
    ensure_corpus(corpus, train=args.train_samples, heldout=args.heldout_samples)
    t0 = time.perf_counter()
    ours = run_ours(corpus, steps=args.steps, extra=args.ours, out=args.out.resolve() / time.strftime("%H%M%S"))
    t_ours = time.perf_counter() - t0
    result: dict = {
        "steps": args.steps,
        "global_batch": GLOBAL_BATCH,
        "ours": ours,
        "ours_overrides": args.ours,
        "seconds": {"ours": round(t_ours)},
    }
    if not args.skip_reference:
        t0 = time.perf_counter()
        reference = run_reference(corpus, steps=args.steps)
        result["seconds"]["reference"] = round(time.perf_counter() - t0)
        result["reference"] = reference
        result["ratio_min"] = round(min(ours[m] / max(reference[m], 1e-9) for m in ("image", "audio")), 3)
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
