"""Decode-step dispatch budget of the fused norm / rope / cache / routing ops vs the eager torch code they replace.

For one decoder layer's pieces at decode shape (B = 1, T = 1), side by side:
  eager: the torch code they replace (ops/norm.py's CPU reference RMSNorm, residual add + RMSNorm,
         q/k RMSNorm + models/layers.py's RoPE + StaticCache.update, router nn.Linear + ferrum::moe_route);
  fused: ferrum::rms_norm / add_rms_norm / qk_norm_rope_cache / moe_gate_route.
Per call it prints device dispatches (Metal launches + aten compute ops; views and allocations
excluded) and host microseconds (median of many calls):
  eager: on CPU tensors, so it includes the (small, at T = 1) CPU compute: an upper bound of its
         host cost; each of its dispatches costs ~10-20 us of host time on MPS (issue 11);
  fused via torch.ops: the custom-op dispatcher on "meta" tensors, which runs the fake
         implementation (validation + allocation, as the MPS implementation does): no device work;
  fused launcher: the MPS implementation called directly on CPU tensors with a shader compiler
         whose kernels do nothing (validation, allocation, argument packing);
  unchecked launch: the same without validation (`launch_<op>`, for modules that validate once).
All in one process, one after the other.

    python benchmarks/bench_norm_ops.py                     # Qwen3-30B-A3B and Gemma-3 dims, float32
    python benchmarks/bench_norm_ops.py --dtype float16 --calls 2000   # (CPU float16 matmuls are slow: eager router)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ferrum_mps.metal as metal
import ferrum_mps.ops  # noqa: F401  (registers torch.ops.ferrum.*)
import ferrum_mps.ops.norm as norm_ops
from ferrum_mps.models.cache import StaticCache
from ferrum_mps.models.layers import RoPE

_SKIP = ("empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "detach", "alias")

SHAPES = {  # H, Hq, Hkv, D, experts (0: dense), top_k, rope base
    "qwen3-30b-a3b": (2048, 32, 4, 128, 128, 8, 1e6),
    "gemma-3-270m": (640, 4, 1, 256, 0, 0, 1e6),
}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name.startswith(_SKIP)):
            self.n += 1
        return func(*args, **(kwargs or {}))


class _Unchecked:
    """The launch functions under the names of the ops."""

    rms_norm, add_rms_norm = norm_ops.launch_rms_norm, norm_ops.launch_add_rms_norm
    qk_norm_rope_cache, moe_gate_route = norm_ops.launch_qk_norm_rope_cache, norm_ops.launch_moe_gate_route


class _StubLibrary:
    """compile_shader's calling convention, kernels that count their launches and do nothing."""

    launches = 0

    def __getattr__(self, name):
        def launch(*args, **kwargs):
            _StubLibrary.launches += 1

        return launch


def _host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def _dispatches(fn) -> int:
    _StubLibrary.launches = 0
    with _Count() as c:
        fn()
    return c.n + _StubLibrary.launches


def _pieces(name: str, dtype: torch.dtype, dev: str, fused_ops) -> list[tuple]:
    """(label, eager fn, fused fn) on tensors of device `dev`; fused_ops: ferrum_mps.metal or torch.ops.ferrum."""
    H, Hq, Hkv, D, E, k, base = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(dev)  # noqa: E731
    x, res, w = r(1, 1, H), r(1, 1, H), r(H)
    q, kk, v, qw, kw = r(1, 1, Hq, D), r(1, 1, Hkv, D), r(1, 1, Hkv, D), r(D), r(D)
    # The eager baseline is the torch code (models/layers.py's RMSNorm now calls the fused op itself).
    norm, qn, kn = (lambda t, ww=ww: norm_ops._rms(t, ww, 1e-6) for ww in (w, qw, kw))
    rope = RoPE(D, base).to(dev)
    S, cp = 4096, torch.tensor([100], device=dev)
    pos = cp[None]
    cfg = type("C", (), dict(num_key_value_heads=Hkv, head_dim=D, num_hidden_layers=1, max_position_embeddings=S))
    cache = StaticCache(cfg, 1, S, device=dev, dtype=dtype)
    kc, vc = cache.k[0].clone(), cache.v[0].clone()

    def eager_qk():
        cs = rope.cos_sin(pos)
        qq, k2 = qn(q), kn(kk)
        qq, k2 = rope(qq, cs).transpose(1, 2), rope(k2, cs).transpose(1, 2)
        return cache.update(k2, v.transpose(1, 2), 0, {"cache_position": cp}), qq

    m = fused_ops
    rows = [
        ("rms_norm", lambda: norm(x), lambda: m.rms_norm(x, w, 1e-6)),
        ("residual add + rms_norm", lambda: norm(res + x), lambda: m.add_rms_norm(x, res, w, 1e-6)),
        ("q/k norm + rope + cache write", eager_qk,
         lambda: m.qk_norm_rope_cache(q, kk, v, qw, kw, 1e-6, rope.inv_freq, pos, False, kc, vc, cp)),
    ]
    if E:
        rw, x2 = r(E, H), x.view(1, H)
        rows.append(("router + routing", lambda: torch.ops.ferrum.moe_route(F.linear(x2, rw), k, True),
                     lambda: m.moe_gate_route(x2, rw, k, True)))
    return rows


def bench(name: str, dtype: torch.dtype, calls: int) -> list[tuple]:
    out = []
    meta = _pieces(name, dtype, "meta", torch.ops.ferrum)
    with metal.use_shader_compiler(lambda source: _StubLibrary()):
        stub = _pieces(name, dtype, "cpu", metal)
        bare = _pieces(name, dtype, "cpu", _Unchecked)
        for (label, _, via_op), (_, eager, launcher), (_, _, unchecked) in zip(meta, stub, bare):
            de, df = _dispatches(eager), _dispatches(launcher)
            te, to, tl, tu = (_host_us(f, calls) for f in (eager, via_op, launcher, unchecked))
            out.append((name, label, de, df, te, to, tl, tu))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--calls", type=int, default=1000)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    head = ("model", "piece", "dispatches eager", "fused", "host us eager", "fused via torch.ops", "ratio",
            "fused launcher", "ratio", "unchecked launch", "ratio")
    rows = [r for m in a.models for r in bench(m, dtype, a.calls)]
    cells = [head] + [
        (m, lab, str(de), str(df), f"{te:.1f}", f"{to:.1f}", f"{te / to:.2f}x", f"{tl:.1f}", f"{te / tl:.2f}x",
         f"{tu:.1f}", f"{te / tu:.2f}x")
        for m, lab, de, df, te, to, tl, tu in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    print(f"per decode call (B = 1, T = 1), {a.dtype} activations, {torch.get_num_threads()} CPU threads")
    for c in cells:
        print("  ".join(s.ljust(wd) for s, wd in zip(c, widths)))


if __name__ == "__main__":
    main()
