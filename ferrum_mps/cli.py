"""`python -m ferrum_mps <command>`: one sub-command per function, registered in `build_parser`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _short(v: Any, limit: int = 8) -> Any:
    if isinstance(v, float):
        return f"{v:.7g}"  # GGUF floats are float32: show the digits they carry
    if isinstance(v, list) and len(v) > limit:
        return f"[{', '.join(map(repr, v[:limit]))}, ...] ({len(v)} items)"
    return v


def summarize(gf) -> dict[str, Any]:
    """What `info` prints, as plain data: architecture, hyperparameters, per-quant-type counts."""
    types: dict[str, dict[str, int]] = {}
    for qt in gf.tensors.values():
        row = types.setdefault(qt.qtype.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += qt.numel
        row["bytes"] += qt.nbytes
    md = gf.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    return {
        "path": str(gf.path),
        "file_bytes": gf.file_size,
        "version": gf.version,
        "architecture": gf.architecture,
        "name": md.get("general.name"),
        "file_type": md.get("general.file_type"),
        "hyperparameters": gf.hparams,
        "tokenizer": {
            "model": md.get("tokenizer.ggml.model"),
            "tokens": len(tokens) if isinstance(tokens, list) else None,
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        },
        "tensor_count": len(gf.tensors),
        "parameters": sum(r["parameters"] for r in types.values()),
        "tensor_bytes": sum(r["bytes"] for r in types.values()),
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
    }


def _print_info(s: dict[str, Any], out) -> None:
    w = lambda line="": print(line, file=out)  # noqa: E731
    w(f"file:          {s['path']} ({_human_bytes(s['file_bytes'])}, GGUF v{s['version']})")
    w(f"architecture:  {s['architecture']}")
    if s["name"]:
        w(f"name:          {s['name']}")
    tok = s["tokenizer"]
    if tok["model"]:
        w(f"tokenizer:     {tok['model']}, {tok['tokens']} tokens, bos {tok['bos_token_id']}, eos {tok['eos_token_id']}")
    hp = s["hyperparameters"]
    if hp:
        w("hyperparameters:")
        width = max(map(len, hp))
        for k, v in hp.items():
            w(f"  {k:<{width}}  {_short(v)}")
    w(f"tensors:       {s['tensor_count']}, {s['parameters']:,} parameters ({_human_count(s['parameters'])}), "
      f"{_human_bytes(s['tensor_bytes'])}")
    w(f"  {'type':<8}{'tensors':>8}{'parameters':>16}{'bytes':>16}{'bits/weight':>13}")
    for name, r in s["types"].items():
        bpw = 8 * r["bytes"] / r["parameters"] if r["parameters"] else 0.0
        w(f"  {name:<8}{r['tensors']:>8}{r['parameters']:>16,}{r['bytes']:>16,}{bpw:>13.2f}")
    total_bpw = 8 * s["tensor_bytes"] / s["parameters"] if s["parameters"] else 0.0
    w(f"  {'total':<8}{s['tensor_count']:>8}{s['parameters']:>16,}{s['tensor_bytes']:>16,}{total_bpw:>13.2f}")


def cmd_info(args: argparse.Namespace) -> int:
    from .gguf_file import read_gguf

    s = summarize(read_gguf(args.file))
    if args.json:
        json.dump(s, sys.stdout, indent=2)
        print()
    else:
        _print_info(s, sys.stdout)
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="architecture, hyperparameters and bytes per quant type of a GGUF file")
    p.add_argument("file", type=Path, help="a .gguf file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferrum-mps", description="GGUF models in PyTorch with Metal kernels.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    from .cli_generate import add_generate_parser

    add_generate_parser(sub)
    from .server import add_serve_parser

    add_serve_parser(sub)
    from .selftest import add_parser as add_selftest_parser

    add_selftest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError) as e:  # GGUFError is a ValueError; missing files are OSErrors
        _error(args, e, str(e))
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback only with -v
        if args.verbose:
            raise
        _error(args, e, f"internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)")
    return 1


def _error(args: argparse.Namespace, e: BaseException, msg: str) -> None:
    """One line on stderr: a message may quote file contents (keys, templates) that hold newlines."""
    log.debug("%s failed", args.command, exc_info=e)
    line = " ".join(msg.split()) or type(e).__name__
    print(f"ferrum-mps {args.command}: error: {line}", file=sys.stderr)

