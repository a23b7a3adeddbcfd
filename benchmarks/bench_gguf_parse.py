"""GGUF parsing: ferrum's read_gguf vs gguf-py's GGUFReader (+ field contents), side by side.

Each case runs in a fresh subprocess per reader, which reports wall time and peak resident memory
(ru_maxrss minus the interpreter's after imports), then the ratio is printed:

    python benchmarks/bench_gguf_parse.py                # all cases
    python benchmarks/bench_gguf_parse.py --keys 400000  # the 12 MB metadata-only case of issue 9
    python benchmarks/bench_gguf_parse.py --gemma /tmp/gemma.gguf   # a real model file
    python benchmarks/bench_gguf_parse.py --before-src DIR  # + a column for another checkout's read_gguf
                                                            # (e.g. `git archive OTHER ferrum_mps models | tar -x -C DIR`)

Cases: a file of N u32 keys; a 262,144-token string vocabulary (Gemma-3's size); the embedded
Gemma-3-270M file when it is cached; then for ferrum only, malformed files gguf-py takes long on or
cannot read (1M empty nested arrays; 100k-deep nesting).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
if kind == "ferrum":
    from ferrum_mps.gguf_file import read_gguf as _r
    def run(p):
        f = _r(p)
        return len(f.metadata)
else:
    import gguf
    def run(p):
        r = gguf.GGUFReader(p)
        return len([f.contents() for f in r.fields.values()])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    n, err = run(path), None
except BaseException as e:
    n, err = None, f"{type(e).__name__}: {str(e)[:100]}"
dt = time.perf_counter() - t0
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"seconds": dt, "mb": rss, "keys": n, "error": err}))
"""


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def many_keys(path: Path, n: int) -> Path:
    path.write_bytes(_header(0, n) + b"".join(_s(f"k.{i:07d}".encode()) + struct.pack("<II", 4, i) for i in range(n)))
    return path


def vocab(path: Path, n: int = 262_144) -> Path:
    body = _s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n) + b"".join(_s(f"tok{i}".encode()) for i in range(n))
    body += _s(b"tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, n) + struct.pack(f"<{n}f", *range(n))
    path.write_bytes(_header(0, 2) + body)
    return path


def nested(path: Path, n: int = 1_000_000) -> Path:
    path.write_bytes(_header(0, 1) + _s(b"x") + struct.pack("<IIQ", 9, 9, n) + struct.pack("<IQ", 0, 0) * n)
    return path


def deep(path: Path, d: int = 100_000) -> Path:
    path.write_bytes(_header(0, 1) + _s(b"x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * d + struct.pack("<IQ", 0, 0))
    return path


def measure(kind: str, path: Path, timeout: float, before_src: str | None = None) -> dict:
    env = None
    if kind == "before":  # the same child, importing ferrum_mps from another source tree first
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [before_src, os.environ.get("PYTHONPATH")]))}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, "ferrum" if kind == "before" else kind, str(path)],
                           capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=tempfile.gettempdir())  # not the checkout: `python -c` puts the cwd first on sys.path
        return json.loads(r.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "mb": float("nan"), "keys": None, "error": f"timeout after {timeout:.0f} s"}


def show(name: str, path: Path, res: dict) -> None:
    size = path.stat().st_size / 2**20
    print(f"\n{name} ({size:.1f} MB)")
    for kind, r in res.items():
        what = r["error"] or f"{r['keys']} keys"
        print(f"  {kind:<7} {r['seconds']:8.2f} s  {r['mb']:8.0f} MB peak RSS added   {what}")
    f = res["ferrum"]
    for other in ("gguf-py", "before"):
        if other in res and f["seconds"] > 0:
            o = res[other]
            print(f"  {other} / ferrum: time x{o['seconds'] / f['seconds']:.2f}, memory x{o['mb'] / max(f['mb'], 1):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000, help="keys in the many-keys case (issue 9 used 400000)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per reader run")
    ap.add_argument("--gemma", type=Path, help="a real GGUF file (default: the cached Gemma-3-270M, if any)")
    ap.add_argument("--before-src", help="a source tree whose ferrum_mps is measured too, as 'before'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(f"{args.keys} u32 keys", many_keys(tmp / "keys.gguf", args.keys)),
                 ("262,144-token vocabulary + scores", vocab(tmp / "vocab.gguf"))]
        gemma = args.gemma
        if gemma is None:
            try:
                from ferrum_mps.default_model import cache_dir

                gemma = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
            except ImportError:
                pass
        if gemma is not None and gemma.is_file():
            cases.append((f"{gemma.name} (a real model)", gemma))
        kinds = ("ferrum", "before") if args.before_src else ("ferrum",)
        for name, path in cases:
            show(name, path, {k: measure(k, path, args.timeout, args.before_src) for k in (*kinds, "gguf-py")})
        for name, path in [("1M empty nested arrays (malformed)", nested(tmp / "nested.gguf")),
                           ("100k-deep nested arrays (malformed)", deep(tmp / "deep.gguf"))]:
            show(name, path, {k: measure(k, path, args.timeout, args.before_src) for k in kinds})


if __name__ == "__main__":
    main()
