"""`python -m serve export=PATH [key=value ...]`: the HTTP service on
uvicorn. See serve/cli.py for the keys and serve/app.py for the endpoints.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in
flight finish (up to graceful_s seconds) and exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import tempfile


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def uvicorn_config(cfg, app, **extra):
    import uvicorn

    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=cfg.access_log,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(cfg.graceful_s),
        limit_concurrency=cfg.max_connections,
        server_header=False,
        **extra,
    )


def serve_one(cfg, predictor) -> int:
    import uvicorn

    from serve.app import create_app

    server = uvicorn.Server(uvicorn_config(cfg, create_app(cfg, predictor)))
    # uvicorn handles SIGTERM and SIGINT while it runs (a graceful shutdown),
    # then restores the handlers it found and raises the signal again. Found
    # handlers that ignore it make that second delivery a no-op, so a
    # graceful stop exits 0 instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def serve_many(cfg) -> int:
    """workers > 1: uvicorn's supervisor starts the workers on one socket;
    each loads its own model (serve.app.app_from_env). Metrics are summed
    over the workers through prometheus_client's multiprocess directory."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from serve.app import ENV, config_env

    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="mm-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    os.environ[ENV] = config_env(cfg)
    try:
        config = uvicorn_config(cfg, "serve.app:app_from_env", factory=True, workers=cfg.workers)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        failed = [p for p in supervisor.processes if p.process.exitcode == STARTUP_FAILURE]
        return 1 if failed else 0
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from serve.cli import UsageError, parse_args, usage

    if any(a in ("-h", "--help") for a in args):
        print(usage(), end="")
        return 0
    try:
        cfg = parse_args(args)
        logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        from serve.app import load_predictor, read_keys

        read_keys(cfg.api_keys)  # a missing or empty key file stops the start, not the first request
        if cfg.workers == 1:
            predictor = load_predictor(cfg)
        else:  # each worker loads the model; here only what would fail in all of them
            from data_pipeline.tokenizer import tokenizer_for
            from mm_models.io import read_config

            if not os.path.isfile(cfg.export):
                raise FileNotFoundError(f"{cfg.export} does not exist")
            read_config(cfg.export)
            tokenizer_for(cfg.export)
    except (UsageError, ValueError, OSError, KeyError) as e:
        print(f"serve: error: {one_line(e)}", file=sys.stderr)
        return 2
    if cfg.workers == 1:
        return serve_one(cfg, predictor)
    return serve_many(cfg)


if __name__ == "__main__":
    sys.exit(main())
