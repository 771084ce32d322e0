"""The HTTP service (python -m serve) under load, against the bare model, in one run.

The server runs in a subprocess on 127.0.0.1 with an untrained classifier
of model=NAME (image + audio + text, 72 classes, late fusion; speed does not
depend on the weights) at the demo's geometry (conf/data/demo.yaml). A load
generator, in a process of its own, sends the demo's held-out samples
(image, sound and caption as multipart/form-data, what `curl -F` sends; a
sample lacking a modality goes without it) from C concurrent clients, each
on its own keep-alive connection and waiting for its answer before sending
the next, for --seconds or --requests at each C, whichever comes first.

- samples/s and p50/p95/p99 latency at each C (1, 8, 32), and errors (any
  answer but a 200, or a broken connection: must be 0);
- ratio_vs_forward: the served samples/s at saturation (the most clients)
  ÷ the bare model's forward: Predictor's backend.predict over the same
  samples, decoded and collated beforehand, in batches of max_batch, on
  every core; timed between the runs against the servers (the machine's
  speed drifts), each served figure against the mean of the timings before
  and after it;
- batching_gain: samples/s at the most clients with dynamic batching ÷ the
  same from a server with max_batch=1;
- onnx_vs_torch: the same with runtime=onnx ÷ runtime=torch, where
  train/onnx_export.py and serve/onnx_backend.py are installed (the graph
  written by train.onnx_export.export_onnx); else left out, and the output
  says why.

The servers run side by side, idle but for the one driven. The three
ratios are medians over --repeats rounds (batched, max_batch=1 and onnx,
then the model alone), with their smallest and largest.

    python benchmarks/serve_load.py [--model small] [--shards data/demo/heldout] [--clients 1,8,32]
        [--seconds 10] [--requests 4000] [--repeats 5] [--max-batch 16] [--max-wait-ms 5]
        [--threads 0] [--decode-threads 2] [--no-onnx]

Without --shards' directory (`make demo-data` writes data/demo/heldout) the
demo's held-out corpus is written to a temporary directory, as the Makefile
writes it. The last line is JSON: {"levels": {"1": {"sps", "p50_ms", "p95_ms",
"p99_ms", "requests", "errors", "mean_batch"}, ...}, "errors", "forward_sps",
"ratio_vs_forward", "batching_gain", "onnx_vs_torch" (where measured), ...};
the exit status is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# -- the samples -------------------------------------------------------------------------
def read_samples(shards: Path) -> list[dict]:
    """Every sample of the shards in `shards`: {"key", "image": bytes, "audio":
    (name, bytes), "text": str}, a missing modality absent."""
    samples: dict[str, dict] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                data = t.extractfile(member).read()
                sample = samples.setdefault(key, {"key": key})
                if ext in ("jpg", "jpeg", "png", "webp"):
                    sample["image"] = (member.name, data)
                elif ext in ("flac", "wav", "mp3", "ogg"):
                    sample["audio"] = (member.name, data)
                elif ext == "txt":
                    sample["text"] = data.decode("utf-8")
    out = [s for s in samples.values() if {"image", "audio", "text"} & set(s)]
    if not out:
        raise SystemExit(f"{shards}: no samples in its .tar shards")
    return out


def demo_heldout(out: Path, n: int) -> Path:
    """The demo's held-out shards, as `make demo-data` writes them."""
    from data_pipeline.demo import write_raw
    from data_pipeline.manifest import read_manifest
    from data_pipeline.writer import write_shards

    manifest = write_raw(out / "raw", split="heldout", n=n, seed=1)
    write_shards(read_manifest(manifest), out / "heldout", max_samples=250)
    return out / "heldout"


def multipart(sample: dict, boundary: str) -> bytes:
    parts = []
    types = {"jpg": "image/jpeg", "flac": "audio/flac", "wav": "audio/wav"}
    for field in ("image", "audio"):
        if field in sample:
            name, data = sample[field]
            ctype = types.get(name.rpartition(".")[2], "application/octet-stream")
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            parts.append(head.encode() + f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    if "text" in sample:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
        parts.append(head.encode() + sample["text"].encode() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def http_request(sample: dict, host: str) -> bytes:
    """The whole HTTP/1.1 request for one sample, built once."""
    boundary = uuid.uuid4().hex
    body = multipart(sample, boundary)
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# -- the load generator (its own process) --------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection after it)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    return status, await reader.readexactly(length), close


async def drive(port: int, requests: list[bytes], clients: int, seconds: float, limit: int) -> dict:
    """`clients` connections, each sending the next request when its answer
    came back, until `seconds` pass or `limit` requests were sent."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client():
        nonlocal sent
        reader = writer = None
        while time.perf_counter() < deadline and sent < limit:
            request = requests[sent % len(requests)]
            sent += 1
            t = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                await writer.drain()
                status, body, close = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors.append(f"connection: {type(e).__name__}: {e}")
                writer = None
                continue
            latencies.append(time.perf_counter() - t)
            if status != 200:
                errors.append(f"{status}: {body[:200].decode('utf-8', 'replace')}")
            if close:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else 0.0

    answered = len(latencies) - sum(not e.startswith("connection") for e in errors)  # 200s
    return {
        "sps": round(answered / elapsed, 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(elapsed, 2),
    }


def generate(args) -> None:
    """The load generator's process: one level (--clients), one JSON line;
    with --warmup, every client's first two requests are sent first and not counted."""
    samples = read_samples(Path(args.shards))
    requests = [http_request(s, f"127.0.0.1:{args.port}") for s in samples]
    clients = int(args.clients)

    async def main():
        if args.warmup:
            await drive(args.port, requests, clients, 120, 2 * clients)
        return await drive(args.port, requests, clients, args.seconds, args.requests)

    print(json.dumps(asyncio.run(main())), flush=True)


# -- the servers -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m serve` on 127.0.0.1, idle until a load generator drives it."""

    def __init__(self, export: Path, log: Path, **settings):
        self.port, self.settings, self.warm = free_port(), settings, False
        self.log = open(log, "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", f"export={export}", f"port={self.port}", "access_log=false"]
            + [f"{k}={v}" for k, v in settings.items()],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not self.get("/readyz").startswith("200"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server ({settings}) did not start:\\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def get(self, path: str) -> str:
        """'STATUS BODY' of a GET, or '' when nothing answers."""
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", path)
            r = conn.getresponse()
            return f"{r.status} {r.read().decode()}"
        except OSError:
            return ""

    def batches(self) -> tuple[float, float]:
        """(forwards, samples) so far, from /metrics."""
        values = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith(("mm_serve_batch_size_count", "mm_serve_batch_size_sum")):
                name, value = line.split()
                values[name] = float(value)
        return values.get("mm_serve_batch_size_count", 0.0), values.get("mm_serve_batch_size_sum", 0.0)

    def drive(self, shards: Path, clients: int, args) -> dict:
        """One level from a load generator in its own process; the first one
        against this server warms it up."""
        before = self.batches()
        cmd = [sys.executable, __file__, "--generate", "--port", str(self.port), "--shards", str(shards),
               "--clients", str(clients), "--seconds", str(args.seconds), "--requests", str(args.requests)]  # fmt: skip
        proc = subprocess.run(
            cmd + ([] if self.warm else ["--warmup"]), capture_output=True, text=True, timeout=300 + 2 * args.seconds
        )
        if proc.returncode != 0:
            raise SystemExit(f"the load generator failed:\\n{proc.stderr[-3000:]}")
        self.warm = True
        level = json.loads(proc.stdout.strip().splitlines()[-1])
        after = self.batches()
        forwards = after[0] - before[0]
        level["mean_batch"] = round((after[1] - before[1]) / forwards, 2) if forwards else 0.0
        return level

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the bare model -------------------------------------------------------------------------
def decoded_batches(predictor, samples: list[dict], batch: int) -> list[dict]:
    decoded = [
        predictor.decode(
            image=s["image"][1] if "image" in s else None,
            audio=s["audio"][1] if "audio" in s else None,
            text=s.get("text"),
        )
        for s in samples
    ]
    return [predictor.collate(decoded[i : i + batch]) for i in range(0, len(decoded), batch)]


def forward_sps(predictor, batches: list[dict]) -> float:
    """The backend's predict over every batch once: samples/s."""
    n = sum(len(b["__key__"]) for b in batches)
    t = time.perf_counter()
    for b in batches:
        predictor.backend.predict(b)
    return n / (time.perf_counter() - t)


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of these"


def onnx_missing() -> str | None:
    """Why runtime=onnx cannot be measured here, or None."""
    for module in ("train.onnx_export", "serve.onnx_backend", "onnxruntime", "onnx"):
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} cannot be imported ({e})"
    return None


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="model size (conf/model/NAME.yaml)")
    parser.add_argument("--shards", default="data/demo/heldout", help="held-out shards (written if missing)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, one level after another")
    parser.add_argument("--seconds", type=float, default=10.0, help="the most one level runs")
    parser.add_argument("--requests", type=int, default=4000, help="the most requests one level sends")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the ratios; the median is reported")
    parser.add_argument("--max-batch", type=int, default=0, help="the server's max_batch (0: its default)")
    parser.add_argument("--max-wait-ms", type=float, default=-1, help="the server's max_wait_ms (<0: its default)")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: its default)")
    parser.add_argument("--decode-threads", type=int, default=0, help="the server's decode_threads (0: its default)")
    parser.add_argument("--no-onnx", action="store_true", help="leave runtime=onnx out")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few requests, seconds (the tests)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return generate(args)
    if args.smoke:
        args.model, args.clients, args.seconds, args.requests, args.repeats = "tiny", "1,4", 2.0, 24, 1

    from omegaconf import OmegaConf

    sys.path.insert(0, str(HERE))
    from predict_throughput import make_export

    from data_pipeline import DataConfig
    from serve import Predictor
    from serve.cli import ServeConfig
    from train.config import CONF_DIR

    defaults = ServeConfig()
    max_batch = args.max_batch or defaults.max_batch
    settings = {"max_batch": max_batch}
    for key, value, unset in (
        ("threads", args.threads, 0),
        ("max_wait_ms", args.max_wait_ms, -1),
        ("decode_threads", args.decode_threads, 0),
    ):
        if value != unset:
            settings[key] = value
    levels = [int(c) for c in args.clients.split(",")]
    top = max(levels)
    # A SIGTERM unwinds like Ctrl-C: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = Path(args.shards)
        if not any(shards.glob("*.tar")):
            print(f"{shards} has no shards: writing the demo's held-out corpus", flush=True)
            shards = demo_heldout(tmp / "demo", 64 if args.smoke else 500)
        samples = read_samples(shards)
        data = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF_DIR / "data" / "demo.yaml"))
        )
        export = make_export(tmp, args.model, data)
        why_no_onnx = "--no-onnx" if args.no_onnx else onnx_missing()
        if why_no_onnx is None:
            from train.onnx_export import export_onnx

            export_onnx(export)

        # The ceiling: the model alone (every core), on the same samples decoded beforehand.
        import torch

        predictor = Predictor.load(export)
        threads = torch.get_num_threads()
        batches = decoded_batches(predictor, samples, max_batch)
        forward_sps(predictor, batches[:2])  # warm-up

        servers = {"batched": Server(export, tmp / "batched.log", **settings)}
        servers["unbatched"] = Server(export, tmp / "unbatched.log", **{**settings, "max_batch": 1})
        if why_no_onnx is None:
            servers["onnx"] = Server(export, tmp / "onnx.log", **settings, runtime="onnx")
        try:
            # The levels, each between two timings of the model alone (the machine's speed drifts).
            table, forwards = {}, [forward_sps(predictor, batches)]
            for clients in levels:
                table[str(clients)] = servers["batched"].drive(shards, clients, args)
                forwards.append(forward_sps(predictor, batches))
                level = json.dumps(table[str(clients)])
                print(f"{clients:>3} clients: {level}; model alone {forwards[-1]:.1f}/s", flush=True)
            # Rounds at the most clients: batched, max_batch=1, onnx, then the model alone again.
            rounds = []
            for r in range(args.repeats):
                got = {name: server.drive(shards, top, args) for name, server in servers.items()}
                forwards.append(forward_sps(predictor, batches))
                alone = (forwards[-2] + forwards[-1]) / 2
                rounds.append({"alone": alone, **got})
                summary = ", ".join(f"{name} {level['sps']:.1f}/s" for name, level in got.items())
                print(
                    f"round {r + 1} at {top} clients: {summary}; model alone {alone:.1f}/s (mean of before and after)"
                )
        finally:
            for server in servers.values():
                server.stop()
    if why_no_onnx:
        print(f"runtime=onnx left out: {why_no_onnx}")

    def ratios(f) -> list[float]:
        return [f(r) for r in rounds]

    vs_forward = ratios(lambda r: r["batched"]["sps"] / r["alone"])
    gain = ratios(lambda r: r["batched"]["sps"] / r["unbatched"]["sps"])
    errors = sum(level["errors"] for level in table.values())
    errors += sum(r[name]["errors"] for r in rounds for name in servers)
    result = {
        "levels": {c: {k: v for k, v in level.items() if k != "first_errors"} for c, level in table.items()},
        "errors": errors,
        "forward_sps": round(median(forwards), 2),
        "forward_sps_min_max": [round(min(forwards), 2), round(max(forwards), 2)],
        "saturation_clients": top,
        "ratio_vs_forward": round(median(vs_forward), 3),
        "ratio_vs_forward_min_max": [round(min(vs_forward), 3), round(max(vs_forward), 3)],
        "batching_gain": round(median(gain), 3),
        "batching_gain_min_max": [round(min(gain), 3), round(max(gain), 3)],
        "served_sps": round(median(ratios(lambda r: r["batched"]["sps"])), 2),
        "unbatched_sps": round(median(ratios(lambda r: r["unbatched"]["sps"])), 2),
    }
    if "onnx" in servers:
        onnx = ratios(lambda r: r["onnx"]["sps"] / r["batched"]["sps"])
        result["onnx_vs_torch"] = round(median(onnx), 3)
        result["onnx_vs_torch_min_max"] = [round(min(onnx), 3), round(max(onnx), 3)]
        result["onnx_sps"] = round(median(ratios(lambda r: r["onnx"]["sps"])), 2)
    first = [e for level in table.values() for e in level["first_errors"]]
    first += [e for r in rounds for name in servers for e in r[name]["first_errors"]]
    result.update(
        model=args.model,
        samples=len(samples),
        repeats=len(rounds),
        max_batch=max_batch,
        max_wait_ms=settings.get("max_wait_ms", defaults.max_wait_ms),
        server_threads=settings.get("threads", defaults.threads),
        decode_threads=settings.get("decode_threads", defaults.decode_threads),
        forward_threads=threads,
        cpu_flags=cpu_flags(),
        cores=os.cpu_count(),
    )
    print(
        f"model={args.model}, {len(samples)} held-out samples, max_batch={max_batch}, medians of {len(rounds)} "
        f"rounds at {top} clients: ratio_vs_forward {result['ratio_vs_forward']} (target >= 0.8), batching_gain "
        f"{result['batching_gain']} (target >= 2)"
        + (f", onnx_vs_torch {result['onnx_vs_torch']}" if "onnx_vs_torch" in result else "")
        + f", errors {errors}{': ' + '; '.join(first[:3]) if first else ''}"
    )
    print(json.dumps(result))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
