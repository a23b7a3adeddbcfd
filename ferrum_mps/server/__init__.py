"""`python -m ferrum_mps serve`: an OpenAI-compatible HTTP server for one GGUF model (extra `serve`).

    python -m ferrum_mps serve --model Qwen3-30B-A3B-Q4_K_M.gguf --port 8080
    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")

engine.py runs the model (one worker thread, requests decoded together as left-padded batches);
api.py is the HTTP side (Starlette + pydantic, served by uvicorn). Both import lazily, so the
other sub-commands work without the `serve` extra installed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a GGUF model over an OpenAI-compatible HTTP API",
                              description="Serve a GGUF model at /v1/chat/completions, /v1/completions and "
                                          "/v1/models (OpenAI's API). Without --model, serves the embedded "
                                          "default (Gemma-3-270M Q4_K_M).")
    p.add_argument("--model", help="path of a .gguf file (default: the embedded Gemma-3-270M Q4_K_M)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    p.add_argument("--device", default=None, help="mps or cpu (default: mps when available)")
    p.add_argument("--default-max-tokens", type=int, default=4096,
                   help="max_tokens of requests that give none (default 4096, at most what the context leaves)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most requests decoded together in one batch (default 8; 1 = one at a time)")
    p.set_defaults(func=run_serve)
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.default_max_tokens < 1:
        raise ValueError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    try:
        import uvicorn

        from .api import Server
        from .engine import Engine
    except ImportError as e:  # the CLI reports OSErrors as clean one-line errors
        raise OSError(f"serve needs the `serve` extra ({e.name} is missing): pip install 'ferrum-mps[serve]'") from e
    from ferrum_mps.loading import load_model, load_tokenizer, resolve_device

    if args.model is None:
        from ferrum_mps.default_model import default_model_path

        try:
            path = default_model_path()
        except RuntimeError as e:
            raise OSError(str(e)) from e
    else:
        path = Path(args.model)
    device = resolve_device(args.device)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    sock = _bind(args.host, args.port)  # before the long load: a taken port fails at once
    engine = None
    try:
        tokenizer = load_tokenizer(path)
        model = load_model(path, device=device, progress=False)
        engine = Engine(model, tokenizer, max_batch=args.max_batch)
        server = Server(engine, model_id=Path(path).stem, api_key=args.api_key,
                        default_max_tokens=args.default_max_tokens)
        if args.host not in LOOPBACK and args.api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach it can use the model", args.host)
        host, port = sock.getsockname()[:2]
        print(f"ferrum-mps serve: {server.model_id} on http://{host}:{port}/v1 ({device}, context {engine.context}, "
              f"max batch {engine.max_batch})", file=sys.stderr, flush=True)
        config = uvicorn.Config(server.app, log_level="info" if args.verbose else "warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if engine is not None:
            engine.close()
        sock.close()
    return 0


@contextlib.contextmanager
def serving(server, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
    """Run `server` (an api.Server) under uvicorn in a background thread; yields its base URL (…/v1).

    For tests and benchmarks: in-process, on a free loopback port by default. Stops uvicorn on exit
    (the Engine stays the caller's to close).
    """
    import uvicorn

    sock = _bind(host, port)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="ferrum-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    try:
        h, p = sock.getsockname()[:2]
        yield f"http://{h}:{p}/v1"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()
