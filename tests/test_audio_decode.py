"""Audio decoding as the loader does it: FLAC and WAV through miniaudio give
soundfile's samples (damaged, empty, unsigned 8-bit and falsely counted files
included), and the log-mel and its mel filters are librosa's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from data_pipeline import DataConfig


@pytest.mark.parametrize(
    "fmt,subtype,rate,channels",
    [
        ("FLAC", "PCM_16", 16000, 1),
        ("FLAC", "PCM_24", 44100, 2),
        ("WAV", "PCM_16", 22050, 1),
        ("WAV", "PCM_24", 16000, 2),
        ("WAV", "FLOAT", 48000, 1),
        ("WAV", "PCM_32", 16000, 1),
    ],
)
def test_flac_and_wav_give_soundfiles_samples(fmt, subtype, rate, channels, monkeypatch):
    """FLAC and WAV are read by miniaudio (faster from memory), everything
    else by soundfile: for these lossless formats the two must agree sample
    for sample, whole files and the starts the loader decodes alike."""
    import io

    import numpy as np
    import soundfile

    from data_pipeline.decode import load_audio

    wav = np.random.default_rng(rate).uniform(-0.9, 0.9, (rate * 3, channels)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wav, rate, format=fmt, subtype=subtype)
    data = buf.getvalue()
    reference, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = reference.mean(axis=1) if channels > 1 else reference[:, 0]

    def refused(*args, **kwargs):
        raise AssertionError("soundfile was used for a FLAC or WAV")

    monkeypatch.setattr(soundfile, "SoundFile", refused)  # so the samples below are miniaudio's
    for max_samples in (2 * rate, 5 * rate):  # the first 2 s of 3; more than the file holds
        got = load_audio(data, sample_rate=rate, max_samples=max_samples)
        want = mono[:max_samples]
        assert got.dtype == np.float32 and got.shape == want.shape, (max_samples, got.shape)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # At another rate both paths resample the same source samples alike.
    whole = load_audio(data, sample_rate=16000, max_samples=16000 * 5)
    monkeypatch.undo()
    np.testing.assert_allclose(
        load_audio(data, sample_rate=16000, max_samples=32000)[:7000], whole[:7000], atol=1e-4, rtol=0
    )
    np.testing.assert_array_equal(whole, load_audio(data, sample_rate=16000))  # soundfile's whole file


@pytest.mark.parametrize(
    "raw",
    [
        b"fLaC",
        b"fLaC" + b"\x00" * 50,
        b"fLaC" + bytes(range(256)) * 40,
        b"RIFF\xff\xff\xff\x7fWAVEfmt " + b"\xff" * 64,
        b"RIFF\x00\x00\x00\x00WAVE",
    ],
    ids=["magic-only", "zeros", "garbage", "wav-huge-sizes", "wav-no-chunks"],
)
def test_a_damaged_flac_or_wav_is_a_clear_error(raw):
    import soundfile

    from data_pipeline.decode import load_audio

    with pytest.raises((soundfile.LibsndfileError, RuntimeError, ValueError)):
        load_audio(raw, sample_rate=16000, max_samples=16000)


@pytest.mark.parametrize("fmt", ["FLAC", "WAV"])
def test_a_flac_or_wav_without_samples_reads_as_soundfile_reads_it(fmt):
    import io

    import numpy as np
    import soundfile

    from data_pipeline.decode import load_audio

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(0, dtype=np.float32), 16000, format=fmt)
    try:
        want = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]
    except soundfile.LibsndfileError:
        with pytest.raises(soundfile.LibsndfileError):
            load_audio(buf.getvalue(), sample_rate=16000, max_samples=16000)
        return
    assert load_audio(buf.getvalue(), sample_rate=16000, max_samples=16000).shape == want.shape == (0,)


def test_only_short_files_are_decoded_whole_and_a_false_count_goes_to_soundfile(monkeypatch):
    """miniaudio decodes a file whole, so it gets only files of at most twice
    the window the model reads; soundfile decodes just the start of longer
    ones. A FLAC whose header claims 2**36 samples is such a long file, and
    one that claims fewer samples than it holds is decoded as soundfile
    decodes it (to the count)."""
    import io

    import miniaudio
    import numpy as np
    import soundfile

    from data_pipeline.decode import load_audio

    whole = []
    stream = miniaudio.stream_memory
    monkeypatch.setattr(
        miniaudio, "stream_memory", lambda *a, **k: whole.append(k["frames_to_read"]) or stream(*a, **k)
    )
    wav = np.random.default_rng(5).uniform(-0.5, 0.5, 1600).astype(np.float32)
    for fmt in ("WAV", "FLAC"):
        buf = io.BytesIO()
        soundfile.write(buf, wav, 16000, format=fmt, subtype="PCM_16")
        got = load_audio(buf.getvalue(), sample_rate=16000, max_samples=16000 * 30)
        np.testing.assert_allclose(got, wav, atol=1 / 32768)
    assert whole == [1601, 1601]  # the frames and one more: a buffer the size of the file
    np.testing.assert_allclose(load_audio(buf.getvalue(), sample_rate=16000), wav, atol=1 / 32768)
    assert len(whole) == 2  # a whole file (no window, as W&B's audio tables ask) is soundfile's

    long = np.tile(wav, 20)  # 2 s
    for claimed in (2**36 - 1, 1000):
        buf = io.BytesIO()
        soundfile.write(buf, long, 16000, format="FLAC", subtype="PCM_16")
        data = bytearray(buf.getvalue())
        assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the STREAMINFO block first
        # The last 36 of the 64 bits after the block and frame sizes hold the sample count.
        fields = int.from_bytes(data[18:26], "big")
        data[18:26] = ((fields >> 36 << 36) | claimed).to_bytes(8, "big")
        assert miniaudio.flac_get_info(bytes(data)).num_frames == claimed
        want = soundfile.read(io.BytesIO(bytes(data)), frames=16000, dtype="float32")[0]
        whole.clear()
        got = load_audio(bytes(data), sample_rate=16000, max_samples=16000)
        assert whole == ([] if claimed > 32000 else [claimed + 1])  # the long claim goes to soundfile at once
        assert got.shape == want.shape == (min(claimed, 16000),)
        np.testing.assert_array_equal(got, want)


def test_a_damaged_flac_is_soundfiles_error_not_a_spliced_clip():
    """dr_flac skips a frame that fails its checksum and goes on; libFLAC
    reports it. A FLAC damaged in the middle, or cut short, must not come
    out as a clip with a piece missing: it is soundfile's error (a counted
    bad_audio skip in the loader), as it was before miniaudio."""
    import io

    import numpy as np
    import soundfile

    from data_pipeline.decode import load_audio

    wav = np.random.default_rng(3).uniform(-0.5, 0.5, 24000).astype(np.float32)  # 1.5 s: decoded whole
    buf = io.BytesIO()
    soundfile.write(buf, wav, 16000, format="FLAC")
    clean = buf.getvalue()
    middle = bytearray(clean)
    middle[len(clean) // 2 : len(clean) // 2 + 40] = b"\x55" * 40
    damaged = bytes(middle)
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(io.BytesIO(damaged), frames=16000, dtype="float32")
    with pytest.raises(soundfile.LibsndfileError):
        load_audio(damaged, sample_rate=16000, max_samples=16000)
    # Cut after the window: soundfile reads the window before it finds the cut.
    cut = clean[: len(clean) * 3 // 4]
    want = soundfile.read(io.BytesIO(cut), frames=16000, dtype="float32")[0]
    np.testing.assert_array_equal(load_audio(cut, sample_rate=16000, max_samples=16000), want)


def test_unsigned_8_bit_wav_gives_soundfiles_samples():
    """dr_wav and libsndfile scale unsigned 8-bit samples differently, so
    such a WAV goes to soundfile."""
    import io

    import numpy as np
    import soundfile

    from data_pipeline.decode import load_audio

    buf = io.BytesIO()
    soundfile.write(
        buf, np.array([-1, -0.5, 0, 0.5, 0.99] * 100, dtype=np.float32), 16000, format="WAV", subtype="PCM_U8"
    )
    want = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32")[0]
    np.testing.assert_array_equal(load_audio(buf.getvalue(), sample_rate=16000, max_samples=16000), want)


@pytest.mark.parametrize(
    "sample_rate,n_fft,n_mels",
    [(16000, 512, 64), (16000, 400, 80), (22050, 1023, 128), (8000, 256, 40), (44100, 2048, 64)],
)
def test_mel_filters_are_librosas(sample_rate, n_fft, n_mels):
    """Written here to spare each process librosa's import; the same filters
    (Slaney scale and area normalisation, librosa.filters.mel's defaults),
    odd n_fft included."""
    import librosa.filters

    from data_pipeline.decode import mel_filterbank

    want = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sample_rate / 2)
    got = mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-6, atol=1e-9)


def test_building_a_loader_does_not_import_librosa():
    code = (
        "import sys; from data_pipeline.decode import mel_filterbank; "
        "mel_filterbank(sample_rate=16000, n_fft=512, n_mels=64); "
        "assert 'librosa' not in sys.modules and 'scipy.signal' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("n_fft", [512, 1024])  # frames within the clip; the last one past its end (reflected)
@pytest.mark.parametrize("seconds", [1.5, 0.4])  # longer than the model's window (cropped), and shorter (padded)
def test_log_mel_is_librosas_melspectrogram(seconds, n_fft):
    """The hand-tuned log-mel (cached window, power without the square root,
    only the kept frames) against librosa's reference computation."""
    import io

    import librosa
    import numpy as np
    import soundfile

    from data_pipeline.decode import decode_audio

    cfg = DataConfig(sample_rate=16000, n_fft=n_fft, n_mels=32, audio_frames=48, hop_length=320)
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(1)
    stereo = np.stack([np.sin(2 * np.pi * (200 + 1500 * t) * t), rng.normal(0, 0.05, t.size)], axis=1) * 0.5
    raw = io.BytesIO()
    soundfile.write(raw, stereo.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    got = decode_audio(raw.getvalue(), cfg)

    mono = np.zeros(cfg.audio_samples, dtype=np.float32)
    clip = stereo.mean(axis=1)[: cfg.audio_samples]
    mono[: clip.size] = clip
    mel = librosa.feature.melspectrogram(
        y=mono,
        sr=16000,
        n_fft=n_fft,
        hop_length=320,
        n_mels=32,
        power=2.0,
        center=True,
        pad_mode="reflect",
        fmin=0.0,
        fmax=8000.0,
    )[:, : cfg.audio_frames]
    want = (np.log(mel + 1e-6) - cfg.log_mel_mean) / cfg.log_mel_std
    assert got.shape == (32, 48)
    torch.testing.assert_close(got, torch.from_numpy(want.astype(np.float32)), atol=2e-4, rtol=0)
