"""Side-by-side CPU numbers for ferrum's ops, printed as tables with ratios.

    python benchmarks/bench_ops.py                       # every section
    python benchmarks/bench_ops.py --sections dequant --threads 1 --gguf model.gguf

Sections run in the order of SECTIONS; each is `bench_<name>(args)` and prints its
own table (add a section: write the function, register it in SECTIONS, add its
flags in build_parser).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from ferrum_mps.quants import DEQUANT_TYPES, FORMATS, dequantize_raw, row_nbytes


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


# --- dequant -------------------------------------------------------------------------

def synthetic_raw(qtype: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random blocks with realistic fp16 scales (small, finite): [rows, row_nbytes] uint8."""
    rng = np.random.default_rng(seed)
    nb = row_nbytes(qtype, cols)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        w = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32))
        dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
        return w.to(dtype).view(torch.uint8).reshape(rows, nb)
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * nb // size, size), dtype=np.uint8)
    for off in FORMATS[qtype].f16_fields:
        scale = (np.abs(rng.standard_normal(raw.shape[0])) * 1e-3).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, nb))


def gguf_tensors(path: Path, max_values: int) -> dict[Q, tuple[torch.Tensor, int]]:
    """The largest tensor of each type in a GGUF file, cut to about max_values values: {qtype: (raw, cols)}."""
    from ferrum_mps.gguf_file import read_gguf

    best: dict[Q, object] = {}
    for qt in read_gguf(path).tensors.values():
        if qt.qtype in DEQUANT_TYPES and (qt.qtype not in best or qt.numel > best[qt.qtype].numel):
            best[qt.qtype] = qt
    out = {}
    for qtype, qt in best.items():
        cols = qt.shape[-1]
        raw = qt.raw.reshape(-1, qt.raw.shape[-1])
        out[qtype] = (raw[: max(1, max_values // cols)].clone(), cols)
    return out


def _hf_dequantizer():
    try:
        from transformers.integrations.gguf import dequant as hf
    except ImportError:
        return None
    return hf


def bench_dequant(args) -> None:
    """CPU dequantization throughput (GB/s of float32 output): ferrum vs gguf-py's numpy vs transformers' torch."""
    hf = _hf_dequantizer()
    if args.gguf:
        inputs = gguf_tensors(args.gguf, args.dequant_values)
        source = f"largest tensor of each type in {args.gguf.name}, up to {args.dequant_values:,} values"
    else:
        cols = 4096
        rows = max(1, args.dequant_values // cols)
        inputs = {q: (synthetic_raw(q, rows, cols), cols) for q in DEQUANT_TYPES}
        source = f"random blocks, {rows}x{cols} values"
    table = []
    for qtype, (raw, cols) in inputs.items():
        out_bytes = raw.shape[0] * cols * 4
        ours_out = dequantize_raw(raw, qtype, cols)
        raw_np = raw.numpy()
        ref = gguf_dequantize(raw_np, qtype).reshape(raw.shape[0], cols)
        exact = np.array_equal(ours_out.numpy(), ref, equal_nan=True)
        t_ours = timeit(lambda: dequantize_raw(raw, qtype, cols), args.repeat)
        t_gguf = timeit(lambda: gguf_dequantize(raw_np, qtype), args.repeat)
        t_hf = None
        if hf is not None and int(qtype) in hf.GGML_BLOCK:
            flat = raw.reshape(-1)
            t_hf = timeit(lambda: hf.dequantize(flat, int(qtype), torch.float32), args.repeat)
        gbs = lambda t: out_bytes / t / 1e9  # noqa: E731
        table.append([
            qtype.name, f"{raw.shape[0] * cols:,}", f"{gbs(t_ours):.2f}", f"{gbs(t_gguf):.2f}",
            f"{gbs(t_hf):.2f}" if t_hf else "n/a", f"{t_gguf / t_ours:.2f}x", f"{t_hf / t_ours:.2f}x" if t_hf else "n/a",
            "yes" if exact else "NO",
        ])
    print_table(
        f"dequantize on CPU, GB/s of float32 output ({source}; torch threads {torch.get_num_threads()}, best of {args.repeat})",
        ["type", "values", "ferrum", "gguf-py", "transformers", "vs gguf-py", "vs transformers", "exact vs gguf-py"],
        table,
    )


# --- qlinear -------------------------------------------------------------------------


def bench_qlinear(args) -> None:
    """CPU ferrum::qlinear vs dequantize-then-matmul (ferrum's dequantizer, transformers') at m = 1 and m = 64."""
    import ferrum_mps.ops  # noqa: F401  (registers torch.ops.ferrum)
    from ferrum_mps.quants import quantize

    hf = _hf_dequantizer()
    table = []
    for qtype in (Q.Q4_K, Q.Q6_K):
        for out_f, in_f in ((2048, 2048), (768, 2048)):
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
            raw = quantize(w, qtype)
            for m in (1, 64):
                x = torch.randn(m, in_f)
                t_q = timeit(lambda: torch.ops.ferrum.qlinear(x, raw, int(qtype), out_f, in_f), args.repeat)
                t_d = timeit(lambda: x @ torch.ops.ferrum.dequantize(raw, int(qtype), out_f, in_f, torch.float32).T, args.repeat)
                t_h = None
                if hf is not None and int(qtype) in hf.GGML_BLOCK:
                    flat = raw.reshape(-1)
                    t_h = timeit(lambda: x @ hf.dequantize(flat, int(qtype), torch.float32).view(out_f, in_f).T, args.repeat)
                table.append([
                    qtype.name, f"{out_f}x{in_f}", m, f"{t_q * 1e3:.2f}", f"{t_d * 1e3:.2f}",
                    f"{t_h * 1e3:.2f}" if t_h else "n/a", f"{t_d / t_q:.2f}x", f"{t_h / t_q:.2f}x" if t_h else "n/a",
                ])
    print_table(
        f"qlinear on CPU, ms per call (torch threads {torch.get_num_threads()}, best of {args.repeat}); "
        "ratio > 1: qlinear is faster",
        ["type", "out x in", "m", "qlinear", "deq+mm", "hf deq+mm", "vs deq+mm", "vs hf deq+mm"],
        table,
    )


# --- moe -----------------------------------------------------------------------------


def bench_moe(args) -> None:
    """MoE FFN block at Qwen3-30B-A3B dimensions: FusedMoE (raw Q4_K/Q6_K expert stacks) vs
    transformers' Qwen3MoeSparseMoeBlock holding the same weights dequantized to float32."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from ferrum_mps.nn.moe import FusedMoE

    H, E, k, inter = 2048, args.moe_experts, 8, 768
    qg, qu, qd = Q.Q4_K, Q.Q4_K, Q.Q6_K
    # Random blocks with realistic scales: quantizing 3 x 128 x 768 x 2048 weights takes minutes.
    raws = [synthetic_raw(q, E * o, i, seed=s).view(E, o, -1) for s, (q, o, i) in
            enumerate(((qg, inter, H), (qu, inter, H), (qd, H, inter)))]
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=k,
                         norm_topk_prob=True, experts_implementation="eager")
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(0)) * 0.02)
        deq = [dequantize_raw(r.reshape(-1, r.shape[-1]), q, c).view(E, -1, c) for r, q, c in zip(raws, (qg, qu, qd), (H, H, inter))]
        block.experts.gate_up_proj.copy_(torch.cat(deq[:2], dim=1))
        block.experts.down_proj.copy_(deq[2])
    del deq
    router = torch.nn.Linear(H, E, bias=False)
    with torch.no_grad():
        router.weight.copy_(block.gate.weight)
    moe = FusedMoE(router, *raws, qg, qu, qd, top_k=k)
    raw_mb = sum(r.numel() for r in raws) / 2**20
    float_mb = sum(p.numel() * 4 for p in block.experts.parameters()) / 2**20
    impl = getattr(cfg, "_experts_implementation", None) or "eager"
    repeat = max(1, min(args.repeat, 3))
    table = []
    for T in args.moe_tokens:
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            err = ((moe(x) - block(x)).abs().max() / block(x).abs().max()).item()
            t_f = timeit(lambda: moe(x), repeat)
            t_h = timeit(lambda: block(x), repeat)
        table.append([T, f"{t_f * 1e3:.1f}", f"{t_h * 1e3:.1f}", f"{t_h / t_f:.2f}x", f"{err:.1e}"])
    print_table(
        f"MoE FFN on CPU (hidden {H}, {E} experts, top-{k}, expert width {inter}, gate/up {qg.name}, down {qd.name}), "
        f"ms per call (torch threads {torch.get_num_threads()}, best of {repeat}); expert weights "
        f"{raw_mb:.0f} MB raw vs {float_mb:.0f} MB float32 in transformers ({impl} experts); ratio > 1: FusedMoE is faster",
        ["tokens", "FusedMoE", "transformers", "ratio", "max rel diff"],
        table,
    )


# --- launch --------------------------------------------------------------------------


class _StubKernel:
    def __call__(self, *args, threads=None, group_size=None):  # launches nothing
        return None


class _StubLibrary:
    def __getattr__(self, name: str) -> _StubKernel:
        if name.startswith("_"):
            raise AttributeError(name)
        return _StubKernel()  # a new wrapper per lookup, as torch.mps.compile_shader's library does


def _stub_compiler(source: str) -> _StubLibrary:
    return _StubLibrary()


def _us(fn: Callable[[], object], calls: int, repeat: int) -> float:
    """Best of `repeat` runs of `calls` calls, in microseconds per call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def bench_launch(args) -> None:
    """Host cost of the MPS launch path with every kernel stubbed (a shader compiler whose kernels do
    nothing, on CPU tensors) at decode size (one token): the MPS functions called directly, and through
    an op of the same schema registered three ways (for CPU, in a scratch namespace): a
    torch.library.custom_op, a plain Library.define/impl op, and ferrum_mps.ops.common.ferrum_op (how
    the ferrum ops are registered, when this version has it)."""
    import ferrum_mps.metal as metal
    from ferrum_mps import shaders

    try:
        from ferrum_mps.ops.common import ferrum_op
    except ImportError:
        ferrum_op = None
    calls, repeat = args.launch_calls, args.repeat
    H, N, E, k, inter = 2048, 2048, 128, 8, 768
    raw = synthetic_raw(Q.Q4_K, N, H)
    x = torch.randn(1, H)
    raws = [synthetic_raw(q, E * o, i, seed=s).view(E, o, -1) for s, (q, o, i) in
            enumerate(((Q.Q4_K, inter, H), (Q.Q4_K, inter, H), (Q.Q6_K, H, inter)))]
    qs = (int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K))
    w = torch.full((1, k), 1 / k)
    ids = torch.arange(k, dtype=torch.int32).view(1, k)
    logits = torch.randn(1, E)
    emb, tok = synthetic_raw(Q.Q4_K, 4096, H), torch.tensor([[7]])

    def qlinear(x: torch.Tensor, raw: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
        return metal.qlinear(x, raw, qtype, out_features, in_features)

    def moe_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_raw: torch.Tensor, up_raw: torch.Tensor,
                down_raw: torch.Tensor, gate_qtype: int, up_qtype: int, down_qtype: int, inter: int) -> torch.Tensor:
        return metal.moe_ffn(x, weights, ids, gate_raw, up_raw, down_raw, gate_qtype, up_qtype, down_qtype, inter)

    def empty(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    lib = torch.library.Library("ferrum_bench", "FRAGMENT")
    for fn in (qlinear, moe_ffn, empty):
        name = fn.__name__
        torch.library.custom_op(f"ferrum_bench::{name}", fn, mutates_args=(), device_types="cpu")
        lib.define(f"{name}_lib" + torch.library.infer_schema(fn, mutates_args=()))
        lib.impl(f"{name}_lib", fn, "CPU")
        if ferrum_op is not None:
            ferrum_op(f"ferrum_bench::{name}_fop")(fn)
    ops = torch.ops.ferrum_bench

    def variants(name, *a):
        out = [getattr(ops, name), getattr(ops, f"{name}_lib")] + ([getattr(ops, f"{name}_fop")] if ferrum_op else [])
        return [lambda op=op: op(*a) for op in out]

    rows = []
    with shaders.use_shader_compiler(_stub_compiler):
        cases = [
            ("qlinear_mps, Q4_K 2048x2048, m=1", lambda: qlinear(x, raw, int(Q.Q4_K), N, H),
             variants("qlinear", x, raw, int(Q.Q4_K), N, H)),
            ("moe_ffn_mps, 128 experts top-8, T=1", lambda: moe_ffn(x, w, ids, *raws, *qs, inter),
             variants("moe_ffn", x, w, ids, *raws, *qs, inter)),
            ("moe_route_mps, 128 experts top-8, T=1", lambda: metal.moe_route(logits, k, True), []),
            ("qembedding_mps, Q4_K 4096x2048, 1 id", lambda: metal.qembedding(tok, emb, int(Q.Q4_K), H), []),
            ("torch.empty_like (no launch)", lambda: empty(x), variants("empty", x)),
        ]
        for name, direct, via in cases:
            t_d = _us(direct, calls, repeat)
            row = [name, f"{t_d:.1f}"]
            for fn in via:
                t = _us(fn, calls, repeat)
                row += [f"{t:.1f}", f"{t - t_d:+.1f}"]
            rows.append(row + [""] * (8 - len(row)))
    print_table(
        f"host microseconds per call with kernels stubbed (CPU tensors, torch threads {torch.get_num_threads()}, "
        f"best of {repeat} x {calls} calls): the function called directly and through an op of the same schema; "
        "'+' = the op's dispatch (op minus direct)",
        ["call", "direct", "custom_op", "+", "Library op", "+", "ferrum_op", "+"],
        rows,
    )


# Sections in the order they run.
SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "dequant": bench_dequant,
    "qlinear": bench_qlinear,
    "moe": bench_moe,
    "launch": bench_launch,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)}")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (best is reported)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    p.add_argument("--gguf", type=Path, help="dequant: take each type's largest tensor from this GGUF file")
    p.add_argument("--dequant-values", type=int, default=1 << 22, help="dequant: values per tensor")
    p.add_argument("--moe-tokens", type=lambda v: [int(t) for t in v.split(",")], default=[1, 128],
                   help="moe: token counts, comma-separated")
    p.add_argument("--moe-experts", type=int, default=128, help="moe: number of experts (Qwen3-30B-A3B: 128)")
    p.add_argument("--launch-calls", type=int, default=2000, help="launch: calls per timed run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in SECTIONS:  # registry order, whatever order they were asked in
        if name in names:
            SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
