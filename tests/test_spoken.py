"""The spoken-caption corpus: espeak-ng speech aligned with images and
captions, and a clear error where the synthesiser is missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile

from data_pipeline import spoken


def test_missing_synthesiser_names_the_install(monkeypatch, tmp_path, capsys):
    from data_pipeline.__main__ import main

    monkeypatch.setattr(spoken, "ESPEAK", "no-such-espeak-binary")
    with pytest.raises(spoken.SpeechUnavailable, match="apt-get install espeak-ng"):
        spoken.require_espeak()
    assert main(["demo", str(tmp_path / "raw"), "--spoken", "--train", "2", "--heldout", "1"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_spoken_corpus_speaks_each_caption(tmp_path):
    manifest = spoken.write_raw(tmp_path, split="train", n=24, seed=0, threads=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 24 and {r["class"] for r in rows} <= {f"{z} {c} {s}" for s, c, z in spoken.CLASSES}
    with_audio = [r for r in rows if "audio" in r]
    assert len(with_audio) >= 18
    durations = []
    for r in with_audio:
        wav, rate = soundfile.read(tmp_path / r["audio"], dtype="float32")
        assert rate == spoken.SAMPLE_RATE and len(wav) == int(spoken.SAMPLE_RATE * spoken.MAX_SECONDS)
        # Speech, not silence: loud parts well above the noise floor.
        assert np.abs(wav).max() > 0.25
        durations.append(float((np.abs(wav) > 0.05).mean()))
    # Longer captions take longer to say.
    lengths = [len(r["text"]) for r in with_audio]
    assert np.corrcoef(lengths, durations)[0, 1] > 0.3
