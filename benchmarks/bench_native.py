"""Native CPU kernels vs the torch implementation of the same ops, side by side in one process.

    python benchmarks/bench_native.py                  # real Gemma-3-270M weights, m = 1 and 64
    python benchmarks/bench_native.py --threads 1 --m 1 8 64

Per call (best of --repeat): torch.ops.ferrum.qlinear on the real file's tensors (raw GGUF
bytes, memory-mapped) with the native kernels on and off (`ferrum_mps.native.disabled()`),
qembedding of 1 and 64 ids, and moe_qlinear / moe_ffn on Qwen3-30B-A3B expert dimensions
(128 experts, top-8, 2048 -> 768 -> 2048, Q4_K gate/up, Q6_K down; random weights).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import ferrum_mps.ops  # noqa: F401  (registers torch.ops.ferrum.*)
from ferrum_mps import native, quants
from ferrum_mps.default_model import default_model_path

GEMMA = ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight",
         "blk.0.attn_output.weight", "token_embd.weight")


from bench_ops import timeit as best  # noqa: E402  (best wall time after a warm-up call)


def row(name: str, fn, repeat: int) -> None:
    fast = best(fn, repeat)
    with native.disabled():
        ref = best(fn, max(1, repeat // 3))
    print(f"| {name} | {ref * 1e3:.2f} ms | {fast * 1e3:.3f} ms | {ref / fast:.1f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--m", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-moe", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"native: {native.status()}, threads {torch.get_num_threads()}")
    print("| call | torch path | native | speed-up |\n| --- | --- | --- | --- |")
    reader = GGUFReader(str(default_model_path()))
    tensors = {t.name: t for t in reader.tensors}
    for name in GEMMA:
        t = tensors[name]
        k, n = (int(v) for v in t.shape)
        raw = torch.from_numpy(np.asarray(t.data).reshape(-1))
        qt = int(t.tensor_type)
        for m in a.m:
            x = torch.randn(m, k)
            rep = a.repeat if n * m < 1 << 22 else 3
            row(f"qlinear {name} {t.tensor_type.name} {n}x{k} m={m}",
                lambda: torch.ops.ferrum.qlinear(x, raw, qt, n, k), rep)
    t = tensors["token_embd.weight"]
    raw, dim = torch.from_numpy(np.asarray(t.data).reshape(-1)), int(t.shape[0])
    for count in (1, 64):
        ids = torch.randint(0, int(t.shape[1]), (count,))
        row(f"qembedding Q8_0 {count} ids", lambda: torch.ops.ferrum.qembedding(ids, raw, int(t.tensor_type), dim),
            a.repeat)
    if a.no_moe:
        return
    E, top, H, I = 128, 8, 2048, 768
    g = torch.Generator().manual_seed(0)
    one = lambda q, o, i: quants.quantize(torch.randn(o, i, generator=g) * 0.05, q).view(o, -1)  # noqa: E731
    # 4 distinct experts repeated: same bytes per call, quantizing 128 would take minutes.
    gate = torch.stack([one(Q.Q4_K, I, H) for _ in range(4)] * (E // 4)).contiguous()
    up = torch.stack([one(Q.Q4_K, I, H) for _ in range(4)] * (E // 4)).contiguous()
    down = torch.stack([one(Q.Q6_K, H, I) for _ in range(4)] * (E // 4)).contiguous()
    for T in (1, 19, 64):
        x = torch.randn(T, H)
        w, ids = torch.ops.ferrum.moe_route(torch.randn(T, E), top, True)
        row(f"moe_qlinear gate Q4_K T={T}", lambda: torch.ops.ferrum.moe_qlinear(x, ids, gate, int(Q.Q4_K), I, H),
            a.repeat if T == 1 else 3)
        row(f"moe_ffn Q4_K/Q6_K T={T}",
            lambda: torch.ops.ferrum.moe_ffn(x, w, ids, gate, up, down, int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), I),
            a.repeat if T == 1 else 2)


if __name__ == "__main__":
    main()
