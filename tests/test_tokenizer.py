"""The BPE tokenizer trained on shard captions, load_tokenizer and the CLI hook."""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipeline.bpe import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CaptionStats,
    add_cli,
    iter_captions,
    shard_captions,
    train_bpe,
)
from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "Größe-Kreis", "三角形", "звезда"]
COLOURS = ["red", "green", "blue", "yellow", "café au lait", "naïve pink", "赤い", "синий"]
SIZES = ["small", "large", "tiny 🎨", "huge"]
UNSEEN = [
    "a purple dodecahedron, très élégant",
    "日本語のキャプション 🎉🦀",
    "  leading and trailing spaces\tand a tab\n",
    "literal specials: <pad> <bos> <eos> <mask>",
    "e\u0301 combining accent, \u00a0nbsp, zero\u200bwidth",
]


def _captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)} on a plain background" for _ in range(n)]


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _write_shard(path: Path, captions: list[str], start: int = 0) -> Path:
    members: dict[str, bytes] = {}
    for i, caption in enumerate(captions, start):
        members[f"s{i:06d}.jpg"] = bytes(600)  # stand-in image the reader must pass over
        members[f"s{i:06d}.txt"] = caption.encode("utf-8")
    return _write_tar(path, members)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """3 shards of 100 captions each and a BPE trained on them."""
    root = tmp_path_factory.mktemp("bpe")
    captions = _captions(300, seed=0)
    shards = [
        str(_write_shard(root / f"shard-{k:06d}.tar", captions[k * 100 : (k + 1) * 100], start=k * 100))
        for k in range(3)
    ]
    out = root / "tok" / "tokenizer.json"
    tok = train_bpe(shards, str(out), vocab_size=600, min_frequency=2)
    return {"root": root, "shards": shards, "captions": captions, "out": out, "tok": tok}


def test_specials_fixed_at_byte_tokenizer_ids(corpus):
    tok, byte = corpus["tok"], ByteTokenizer()
    specials = (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id)
    assert specials == (byte.pad_id, byte.bos_id, byte.eos_id, byte.mask_id) == (0, 1, 2, 3)
    saved = json.loads(corpus["out"].read_text(encoding="utf-8"))
    saved_specials = {t["content"]: t["id"] for t in saved["added_tokens"] if t["special"]}
    assert saved_specials == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert 300 < tok.vocab_size <= 600


@pytest.mark.parametrize("which", ["train", "unseen"])
def test_round_trip(corpus, which):
    tok = corpus["tok"]
    texts = corpus["captions"] if which == "train" else UNSEEN
    for text in texts:
        ids = tok.encode(text, max_len=10_000)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        # Specials appear only at the ends, even for text that spells them.
        assert (ids[1:-1] >= len(SPECIAL_TOKENS)).all()
        assert tok.decode(ids) == text


def test_shorter_than_bytes_on_training_captions(corpus):
    tok, byte = corpus["tok"], ByteTokenizer()
    bpe_len = [len(tok.encode(c, max_len=10_000)) for c in corpus["captions"]]
    byte_len = [len(byte.encode(c, max_len=10_000)) for c in corpus["captions"]]
    assert all(b < y for b, y in zip(bpe_len, byte_len))
    assert sum(bpe_len) < 0.4 * sum(byte_len)


def test_truncation_keeps_bos_and_eos(corpus):
    tok = corpus["tok"]
    text = " ".join(corpus["captions"][:5])
    full = tok.encode(text, max_len=10_000)
    for max_len in (3, 4, 17):
        ids = tok.encode(text, max_len=max_len)
        assert len(ids) == max_len
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert ids[1:-1].tolist() == full[1 : max_len - 1].tolist()
    short = tok.encode("a red star", max_len=64)
    assert len(short) < 64 and short[-1] == tok.eos_id
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(text, max_len=2)


def test_load_tokenizer(corpus):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    loaded = load_tokenizer(str(corpus["out"]))
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == corpus["tok"].vocab_size
    for text in corpus["captions"][:20] + UNSEEN:
        assert loaded.encode(text, max_len=64).tolist() == corpus["tok"].encode(text, max_len=64).tolist()


def test_pickled_copy_encodes_the_same(corpus):
    # Loader workers started with spawn receive the tokenizer by pickle.
    tok = corpus["tok"]
    copy = pickle.loads(pickle.dumps(tok))
    for text in UNSEEN:
        assert copy.encode(text, max_len=64).tolist() == tok.encode(text, max_len=64).tolist()


def test_broken_shards_give_what_the_loader_reads_of_them(corpus, tmp_path, caplog):
    """BPE training reads shards with the loader's reader: a shard cut
    part-way gives the captions of its whole samples before the cut (as
    training sees it), and one with none is skipped and logged."""
    good = corpus["shards"][:2]
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(good[0]).read_bytes()[:5000])
    cut_at_header = tmp_path / "cut-at-header.tar"  # tarfile alone would read this as a short, valid tar
    cut_at_header.write_bytes(Path(good[0]).read_bytes()[: 512 * 8 + 100])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file" * 100)
    shards = [good[0], str(truncated), str(garbage), good[1], str(cut_at_header)]

    stats = CaptionStats()
    with caplog.at_level(logging.WARNING, logger="data_pipeline.bpe"):
        captions = list(iter_captions(shards, stats))
    first = corpus["captions"][:100]
    cut = shard_captions(str(truncated), CaptionStats())
    cut_header = shard_captions(str(cut_at_header), CaptionStats())
    assert cut and cut == first[: len(cut)] and cut_header and cut_header == first[: len(cut_header)]
    assert captions == first + cut + corpus["captions"][100:200] + cut_header
    assert stats.captions == len(captions) and stats.shards_read == 4
    assert stats.shards_skipped == [str(garbage)]
    assert sum("skipping shard" in r.message for r in caplog.records) == 1

    tok = train_bpe(shards, str(tmp_path / "tok.json"), vocab_size=400)
    assert tok.decode(tok.encode(corpus["captions"][0], max_len=256)) == corpus["captions"][0]


def test_caption_members_chosen_as_the_loader_does(tmp_path):
    shard = _write_tar(
        tmp_path / "mixed.tar",
        {
            "a.txt": b"from txt",
            "a.caption": b"ignored: a.txt wins",
            "b.caption": b"  from caption  ",
            "c.txt": b"   ",  # empty after strip, as the loader sees it
            "d.json": b"{}",
            "dir/e.txt": b"in a folder",
            "f.txt": b"\xff\xfe bad utf-8",
        },
    )
    stats = CaptionStats()
    assert sorted(iter_captions([str(shard)], stats)) == ["from caption", "from txt", "in a folder"]
    assert stats.captions == 3 and not stats.shards_skipped


def test_no_captions_is_a_clear_error(tmp_path):
    shard = _write_tar(tmp_path / "images-only.tar", {"a.jpg": bytes(100), "a.json": b"{}"})
    out = tmp_path / "tok.json"
    with pytest.raises(ValueError, match="no captions"):
        train_bpe([str(shard)], str(out))
    assert not out.exists()


def test_bad_tokenizer_files_name_the_path(tmp_path, corpus):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(missing))
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="malformed.json"):
        BPETokenizer.from_file(malformed)
    # A valid tokenizer JSON whose specials sit elsewhere is refused too.
    wrong = json.loads(corpus["out"].read_text(encoding="utf-8"))
    vocab = wrong["model"]["vocab"]
    vocab["<pad>"], vocab["<eos>"] = vocab["<eos>"], vocab["<pad>"]
    for t in wrong["added_tokens"]:
        t["id"] = vocab[t["content"]]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(wrong), encoding="utf-8")
    with pytest.raises(ValueError, match="swapped.json.*ids 0..3"):
        load_tokenizer(str(swapped))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train(corpus, tmp_path, capsys):
    out = tmp_path / "cli.json"
    brace = str(corpus["root"] / "shard-{000000..000002}.tar")
    assert _cli(["tokenizer", "train", brace, str(out), "--vocab-size", "500", "--min-frequency", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "300 captions" in line and str(out) in line and "vocab size" in line
    tok = load_tokenizer(str(out))
    assert tok.vocab_size <= 500 and f"vocab size {tok.vocab_size}" in line

    assert _cli(["tokenizer", "train", str(corpus["root"]), str(tmp_path / "dir.json")]) == 0
    assert "300 captions" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert _cli(["tokenizer", "train", str(tmp_path / "nothing-*.tar"), str(tmp_path / "t.json")]) == 2
    assert "nothing-*.tar" in capsys.readouterr().err
    _write_tar(tmp_path / "images-only.tar", {"a.jpg": bytes(100)})
    assert _cli(["tokenizer", "train", str(tmp_path), str(tmp_path / "t.json")]) == 2
    assert "no captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["tokenizer"])  # the nested subcommand is required


@pytest.mark.integration  # a subprocess: not in the fast tier
def test_import_data_pipeline_does_not_need_tokenizers():
    code = "import sys, data_pipeline; sys.exit('tokenizers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
