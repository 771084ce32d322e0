"""Tiny exports (built in a second, untrained) and crafted files for the serve tests."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import soundfile
import torch
from conftest import REPO, clean_env
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def tiny_model_config():
    from mm_models import EncoderConfig, ModelConfig

    enc = EncoderConfig(width=32, depth=1, heads=2, patch_size=8)
    return ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=16, image_size=32, n_mels=32, audio_frames=48, max_text_len=48
    )


def tiny_data_config(**changes):
    from data_pipeline import DataConfig

    return DataConfig(
        image_size=32,
        n_mels=32,
        audio_frames=48,
        max_text_len=48,
        log_mel_mean=-8.0,
        log_mel_std=2.5,
        prompts=["{}", "a {} thing"],
        **changes,
    )


def write_export(path: Path, model: torch.nn.Module, *, task: dict | None = None) -> Path:
    """model.safetensors + model.json, as python -m train.export writes them."""
    from safetensors.torch import save_file

    from mm_models import FusionConfig, ObjectiveConfig

    config = {
        "model": dataclasses.asdict(tiny_model_config()),
        "fusion": dataclasses.asdict(FusionConfig()),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "data": json.loads(json.dumps(dataclasses.asdict(tiny_data_config()))),
    }
    if task is not None:
        config["task"] = task
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": "pt"})
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


def classifier_export(
    path: Path, *, modalities=("image", "audio", "text"), multi_label=False, classes=COLOURS, num_classes=None
):
    from mm_models import FusionConfig
    from mm_models.classifier import ClassifierModel, classifier_config

    task = {"name": "classify", "classes": list(classes), "modalities": list(modalities), "head": "linear"}
    if num_classes is not None:
        task["num_classes"] = num_classes
    if multi_label:
        task.update(multi_label=True, threshold=0.5)
    torch.manual_seed(0)
    model = ClassifierModel(tiny_model_config(), FusionConfig(), classifier_config(task))
    model.init_weights()
    return write_export(path, model, task=task)


def pretrained_export(path: Path):
    from mm_models import FusionConfig, ObjectiveConfig, PretrainModel

    torch.manual_seed(0)
    model = PretrainModel(tiny_model_config(), FusionConfig(), ObjectiveConfig())
    model.init_weights()
    return write_export(path, model)


# -- files ------------------------------------------------------------------------
def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def flac_bytes(seed: int = 0, seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    wave = np.random.default_rng(seed).normal(0, 0.1, int(seconds * rate)).astype(np.float32)
    soundfile.write(buf, wave, rate, format="FLAC")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def wav_claiming(seconds: float, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV whose header claims `seconds` of sound, holding 1000 samples."""
    size = int(seconds * rate) * 2
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    data = np.random.default_rng(0).integers(-3000, 3000, 1000, dtype=np.int16).tobytes()
    return (
        b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
        + b"data" + struct.pack("<I", size) + data
    )  # fmt: skip


# -- a real server ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m serve` in a subprocess on 127.0.0.1, its output in a file."""

    def __init__(self, tmp: Path, *args: str, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", f"port={self.port}", *args],
            cwd=tmp,
            env=clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server was not ready in {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss
