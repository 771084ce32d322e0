"""A W&B Table of a few held-out samples and what the model retrieves for
each: the image, the audio and the caption, then the top match in every
direction. Rank 0 only; W&B is imported by the caller's Tracker."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from data_pipeline import DataConfig
from data_pipeline.decode import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS, first_present, load_audio
from data_pipeline.sources import Skip, expand_shards, read_shard, shard_sizes

# (query modality, retrieved modality) per table column.
DIRECTIONS = (("image", "text"), ("audio", "text"), ("text", "image"), ("text", "audio"))
COLUMNS = [
    "key",
    "image",
    "audio",
    "caption",
    "image → caption",
    "audio → caption",
    "caption → image",
    "caption → audio",
    "hits",
]


def top_matches(split: dict, rows: int) -> list[tuple[int, dict[str, int]]]:
    """The first `rows` samples holding all three modalities (or, failing
    that, any), each with the index of its top match per direction."""
    masks, embeds = split["masks"], split["embeds"]
    full = masks["image"] & masks["audio"] & masks["text"]
    partial = (masks["image"] | masks["audio"] | masks["text"]) & ~full
    queries = (full.nonzero().flatten().tolist() + partial.nonzero().flatten().tolist())[:rows]
    unit = {m: F.normalize(e.float(), dim=-1) for m, e in embeds.items()}
    out = []
    for i in queries:
        best = {}
        for a, b in DIRECTIONS:
            if not masks[a][i] or not masks[b].any():
                continue
            sim = unit[b] @ unit[a][i]
            sim[~masks[b]] = -torch.inf
            best[f"{a}->{b}"] = int(sim.argmax())
        out.append((i, best))
    return out


def read_raw(spec: str, keys: set[str], *, allow_pipe: bool) -> dict[str, dict]:
    """Raw members ({ext: bytes}) of the samples named by keys, in one pass over the shards."""
    found: dict[str, dict] = {}
    urls = expand_shards(spec, allow_pipe=allow_pipe)
    for url, size in zip(urls, shard_sizes(urls)):
        for sample in read_shard(url, size=size):
            if not isinstance(sample, Skip) and sample["__key__"] in keys:
                found[sample["__key__"]] = sample
        if len(found) == len(keys):
            break
    return found


def retrieval_table(split: dict, *, data: DataConfig, rows: int):
    """A wandb.Table of `rows` held-out samples and their top matches."""
    import wandb
    from PIL import Image

    matches = top_matches(split, rows)
    keys = split["keys"]
    wanted = {keys[i] for i, best in matches} | {keys[j] for _, best in matches for j in best.values()}
    raw = read_raw(data.heldout, wanted, allow_pipe=data.allow_pipe)

    def caption(key: str) -> str | None:
        text = first_present(raw.get(key, {}), TEXT_EXTS)
        return text.decode("utf-8", "replace").strip() if text is not None else None

    def image(key: str):
        data_ = first_present(raw.get(key, {}), IMAGE_EXTS)
        if data_ is None:
            return None
        with Image.open(io.BytesIO(data_)) as img:
            return wandb.Image(img.convert("RGB"), caption=key)

    def audio(key: str):
        data_ = first_present(raw.get(key, {}), AUDIO_EXTS)
        if data_ is None:
            return None
        return wandb.Audio(load_audio(data_, sample_rate=data.sample_rate), sample_rate=data.sample_rate, caption=key)

    table = wandb.Table(columns=COLUMNS)
    for i, best in matches:
        key = keys[i]
        got = {d: keys[j] for d, j in best.items()}
        hits = sum(k == key for k in got.values())
        table.add_data(
            key,
            image(key),
            audio(key),
            caption(key),
            caption(got["image->text"]) if "image->text" in got else None,
            caption(got["audio->text"]) if "audio->text" in got else None,
            image(got["text->image"]) if "text->image" in got else None,
            audio(got["text->audio"]) if "text->audio" in got else None,
            f"{hits}/{len(got)}",
        )
    return table
