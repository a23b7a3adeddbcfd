"""ferrum::decode_attention at long contexts (and the fused q/k/v, gate/up mat-vecs of a decode step): launches, threadgroups, bytes read, and the kernel run
under the Metal-on-CPU harness at 4K and 32K cache slots, next to the eager path the models use today
(sdpa_gqa over the whole cache).

    python benchmarks/bench_attention.py                 # counts + harness runs (~1 min on 2 cores)
    python benchmarks/bench_attention.py --no-harness    # counts only

Bytes are what the kernels read from device memory by construction: the K/V rows of the slots a
query can see ([p - window + 1, p], each row once per kv head whatever the number of query heads),
the queries, and the float32 partials of the split path (written by launch 1, read by launch 2).
tests/test_ops_attention.py proves the range (NaN outside it never reaches the output).
"""

from __future__ import annotations

import argparse
import time

import torch

import ferrum_mps.metal as metal
import ferrum_mps.ops  # noqa: F401
from ferrum_mps import shaders
from ferrum_mps.ops import attention as A

# name: (Hq, Hkv, D, dtype)
MODELS = {
    "qwen3-30b-a3b": (32, 4, 128, torch.float16),
    "gemma-3-270m": (4, 1, 256, torch.float16),
}


def counts(Hq, Hkv, D, dtype, S, p, window=0, B=1, T=1):
    esize = torch.empty(0, dtype=dtype).element_size()
    hg, nhg, nsplit = A.attention_plan(B, T, Hq, Hkv, S)
    lo = max(0, p - window + 1) if window else 0
    n = p + 1 - lo
    chunk = max(-(-n // nsplit), 128)
    busy = min(nsplit, -(-n // chunk))
    kv = 2 * B * T * Hkv * n * D * esize
    partial = 0 if nsplit == 1 else 2 * B * T * Hq * (busy * D + nsplit * 2) * 4  # empty splits: (m, l) only
    eager_kv = 2 * B * Hkv * S * D * esize  # sdpa over every slot of the cache
    return dict(launches=1 if nsplit == 1 else 2, groups=B * T * Hkv * nhg * nsplit, busy=B * T * Hkv * nhg * busy,
                splits=nsplit, keys_per_group=min(chunk, n), kv=kv, partial=partial, q=B * T * Hq * D * esize, eager_kv=eager_kv)


def mb(x):
    return f"{x / 1e6:.2f}"


def print_counts():
    print("Per call, one layer, B = 1, T = 1 (decode); p = last visible slot")
    hdr = ["model", "cache S", "p", "launches", "threadgroups (busy)", "keys/threadgroup", "K+V MB", "partials MB", "eager sdpa K+V MB"]
    rows = []
    for name, (Hq, Hkv, D, dt) in MODELS.items():
        for S, p in ((4096, 4095), (32768, 32767), (32768, 99)):
            c = counts(Hq, Hkv, D, dt, S, p)
            rows.append([name, S, p, c["launches"], f"{c['groups']} ({c['busy']})", c["keys_per_group"], mb(c["kv"]),
                         mb(c["partial"]), mb(c["eager_kv"])])
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


class Counting:
    def __init__(self, inner):
        self.inner, self.launches = inner, []

    def __call__(self, source):
        lib, outer = self.inner(source), self

        class Lib:
            def __getattr__(self, name):
                k = getattr(lib, name)

                def launch(*a, **kw):
                    outer.launches.append((name, kw["threads"], kw["group_size"]))
                    return k(*a, **kw)

                return launch

        return Lib()


def harness_runs():
    from ferrum_mps.testing.metal_sim import compile_shader

    print("\nUnder the Metal-on-CPU harness (fibers, one core: total work, not GPU speed); p = S - 1")
    hdr = ["model", "cache S", "splits", "launches", "harness s", "ns/slot", "1-split harness s", "max |err| vs CPU op", "CPU op s"]
    rows = []
    for name, S in (("gemma-3-270m", 4096), ("gemma-3-270m", 32768), ("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 32768)):
        Hq, Hkv, D, dt = MODELS[name]
        g = torch.Generator().manual_seed(S)
        q = torch.randn(1, Hq, 1, D, generator=g).to(dt)
        k = torch.randn(1, Hkv, S, D, generator=g).to(dt)
        v = torch.randn(1, Hkv, S, D, generator=g).to(dt)
        pos = torch.tensor([S - 1])
        counting = Counting(compile_shader)
        with metal.use_shader_compiler(counting):
            metal.decode_attention(q, k, v, pos, None, 0, D**-0.5)  # compile
            counting.launches.clear()
            t = time.perf_counter()
            y = metal.decode_attention(q, k, v, pos, None, 0, D**-0.5)
            dt_split = time.perf_counter() - t
            launches = len(counting.launches)
            saved = A.SPLIT_MAX
            A.SPLIT_MAX = 1
            try:
                t = time.perf_counter()
                y1 = metal.decode_attention(q, k, v, pos, None, 0, D**-0.5)
                dt_one = time.perf_counter() - t
            finally:
                A.SPLIT_MAX = saved
        torch.ops.ferrum.decode_attention(q.float(), k.float(), v.float(), pos, None, 0, D**-0.5)  # warm-up
        t = time.perf_counter()
        ref = torch.ops.ferrum.decode_attention(q.float(), k.float(), v.float(), pos, None, 0, D**-0.5)
        dt_cpu = time.perf_counter() - t
        err = max((y.float() - ref).abs().max().item(), (y1.float() - ref).abs().max().item())
        rows.append([name, S, A.attention_plan(1, 1, Hq, Hkv, S)[2], launches, f"{dt_split:.3f}", f"{dt_split / S * 1e9:.0f}",
                     f"{dt_one:.3f}", f"{err:.2e}", f"{dt_cpu:.3f}"])
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))


def fused_matvecs(harness: bool):
    """qkv_linear / gate_up_act vs one qlinear per weight: launches and weight bytes of one decode token."""
    from gguf import GGMLQuantizationType as Q

    from ferrum_mps.quants import row_nbytes

    # name: hidden, (q rows, kv rows, q/k/v types), (inter, gate/up types), from the GGUF files' layouts
    layers = {
        "qwen3-30b-a3b (attn only)": (2048, (4096, 512, (Q.Q4_K, Q.Q4_K, Q.Q6_K)), None),
        "qwen3-8b": (4096, (4096, 1024, (Q.Q4_K, Q.Q4_K, Q.Q6_K)), (12288, (Q.Q4_K, Q.Q4_K))),
        "gemma-3-270m": (640, (1024, 256, (Q.Q5_0, Q.Q5_0, Q.Q8_0)), (2048, (Q.Q5_0, Q.Q5_0))),
    }
    print("\nFused mat-vecs, one decode token (m = 1), per layer")
    hdr = ["model", "op", "launches fused", "launches unfused", "threadgroups", "weight MB read"]
    rows = []
    for name, (H, (nq, nkv, tq), ffn) in layers.items():
        wb = sum(n * row_nbytes(t, H) for n, t in zip((nq, nkv, nkv), tq))
        rows.append([name, "qkv_linear", 1, 3, -(-nq // 4) + 2 * -(-nkv // 4), f"{wb / 1e6:.2f}"])
        if ffn:
            inter, tg = ffn
            wb = sum(inter * row_nbytes(t, H) for t in tg)
            rows.append([name, "gate_up_act", 1, "2 + act*mul (2 torch ops)", -(-inter // 4), f"{wb / 1e6:.2f}"])
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    for r in [hdr] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    if not harness:
        return
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_ops_linear import random_raw  # noqa: E402

    from ferrum_mps.testing.metal_sim import compile_shader

    H, (nq, nkv, tq), (inter, tg) = layers["gemma-3-270m"]
    raws = [random_raw(t, n, H, seed=i) for i, (t, n) in enumerate(zip(tq, (nq, nkv, nkv)))]
    gu = [random_raw(t, inter, H, seed=5 + i) for i, t in enumerate(tg)]
    x = torch.randn(1, H)
    with metal.use_shader_compiler(compile_shader):
        fused = lambda: metal.qkv_linear(x, raws[0], int(tq[0]), raws[1], int(tq[1]), raws[2], int(tq[2]), nq, nkv, H)  # noqa: E731
        split = lambda: [metal.qlinear(x, r, int(t), n, H) for r, t, n in zip(raws, tq, (nq, nkv, nkv))]  # noqa: E731
        fgu = lambda: metal.gate_up_act(x, gu[0], int(tg[0]), gu[1], int(tg[1]), inter, H, "gelu_pytorch_tanh")  # noqa: E731
        sgu = lambda: torch.nn.functional.gelu(metal.qlinear(x, gu[0], int(tg[0]), inter, H), approximate="tanh") * metal.qlinear(x, gu[1], int(tg[1]), inter, H)  # noqa: E731
        res = []
        for f in (fused, split, fgu, sgu):
            f()
            t = time.perf_counter()
            out = f()
            res.append((time.perf_counter() - t, out))
    eq = max((a - b).abs().max().item() for a, b in zip(res[0][1], res[1][1]))
    eg = (res[2][1] - res[3][1]).abs().max().item()
    print(f"harness (gemma-3-270m, full layer): qkv fused {res[0][0]:.3f} s vs 3 x qlinear {res[1][0]:.3f} s "
          f"(max |diff| {eq:.1e}); gate_up fused {res[2][0]:.3f} s vs 2 x qlinear + torch {res[3][0]:.3f} s (max |diff| {eg:.1e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-harness", action="store_true")
    args = ap.parse_args()
    print_counts()
    if not args.no_harness:
        harness_runs()
    fused_matvecs(not args.no_harness)


if __name__ == "__main__":
    main()
