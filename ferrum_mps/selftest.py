"""`python -m ferrum_mps selftest`: every Metal kernel family against the CPU op on the same inputs, then bandwidth.

On a Mac the MPS implementations run on the GPU (torch.mps.compile_shader). Without MPS they run
under the Metal-on-CPU harness (ferrum_mps.testing.metal_sim) on CPU tensors with small shapes:
the same launch code, grids and kernels, so a check that passes there exercises the same code a
Mac runs; the bandwidth part needs a real GPU and is skipped.

Checks are rows of `CHECKS`: a name, a function `env -> max error` (max |device - cpu| over
max |cpu|, float64) and a tolerance. A new op is one more row, usually through `op_check`:

    Check("rms_norm f16", op_check("rms_norm", lambda g, env: (randn(g, 3, 256, dtype=F16), ...)), TOL[F16])

Exit status 0 iff every selected check passes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from . import metal, native, ops, quants, shaders
from .kernels import DTYPE_NAMES
from .ops import moe as M
from .ops.fused_linear import FUSED_QTYPES

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
_DT = DTYPE_NAMES  # "f32" / "f16" / "bf16", as in the kernel names
# Max error over max |reference| for outputs rounded to the activation dtype: the device and CPU
# ops both accumulate in float32 and round once, so they differ by about one unit in the last
# place of the output (float16 2^-10, bfloat16 2^-7), twice that as the bound.
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
EXACT = 0.0

# The types of each kernel family, from the quant-format registry (quants.FORMATS).
DEQUANT_TYPES, ROWS_TYPES, QLINEAR_TYPES, MOE_TYPES = (quants.metal_types(f) for f in ("dequant", "get_rows", "mm", "moe"))
QUICK_TYPES = (Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)  # --quick: a 32-block, the Q4_K_M types
# Byte offsets of the float16 scale fields of the types quants.quantize does not produce: random
# bytes everywhere else are valid codes; the scales are set to moderate values.
_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


@dataclass(frozen=True)
class Env:
    device: torch.device
    harness: bool  # kernels under the Metal-on-CPU harness: keep shapes small

    def size(self, harness: int, gpu: int) -> int:
        return harness if self.harness else gpu


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Env], float]  # max error of the device op against the CPU op
    tol: float
    quick: bool = False  # part of the --quick subset


# ------------------------------------------------------------------------------------ inputs


def randn(g: torch.Generator, *shape: int, dtype=F32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def weights(g: torch.Generator, qt: Q, rows: int, cols: int) -> torch.Tensor:
    """Valid GGML rows [rows, row_nbytes]: llama.cpp-style quantization of N(0, 1) where quants.quantize
    has the type, else random codes with scales in +-[0.001, 0.021]."""
    if qt not in _SCALE_FIELDS:
        return quants.quantize(torch.randn(rows, cols, generator=g), qt)
    block, size = GGML_QUANT_SIZES[qt]
    raw = torch.randint(0, 256, (rows * cols // block, size), dtype=torch.uint8, generator=g)
    for off in _SCALE_FIELDS[qt]:
        n = raw.shape[0]
        d = (torch.rand(n, generator=g) * 0.02 + 0.001) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
        raw[:, off : off + 2] = d.half().view(torch.uint8).view(n, 2)
    return raw.reshape(rows, -1).contiguous()


def expert_stack(g: torch.Generator, qt: Q, experts: int, rows: int, cols: int) -> torch.Tensor:
    return weights(g, qt, experts * rows, cols).view(experts, rows, -1)


def cols_for(qt: Q, env: Env) -> int:
    """A row length of whole blocks; for 32-value blocks deliberately not a multiple of 256."""
    if GGML_QUANT_SIZES[qt][0] == 256:
        return env.size(256, 2048)
    return env.size(96, 2080)


# ------------------------------------------------------------------------------------ comparison


def max_error(got, ref) -> float:
    """max |got - ref| / max |ref| over every tensor output (integer outputs: 0 if equal, else inf)."""
    if isinstance(got, (tuple, list)):
        return max((max_error(a, b) for a, b in zip(got, ref)), default=0.0)
    got = got.detach().cpu()
    if got.shape != ref.shape:
        return float("inf")
    if not ref.is_floating_point():
        return 0.0 if torch.equal(got, ref) else float("inf")
    if got.dtype != ref.dtype:
        return float("inf")
    g, r = got.double(), ref.double()
    if not torch.isfinite(g).all():
        return float("inf")
    return float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) if r.numel() else 0.0


def device_impl(op: str) -> Callable:
    """The MPS implementation of torch.ops.ferrum.<op>: ferrum_mps.metal.<op>, else `<op>_mps` in ferrum_mps.ops.*."""
    fn = getattr(metal, op, None)
    if fn is not None:
        return fn
    for info in pkgutil.iter_modules(ops.__path__):
        fn = getattr(importlib.import_module(f"{ops.__name__}.{info.name}"), f"{op}_mps", None)
        if fn is not None:
            return fn
    raise LookupError(f"no MPS implementation found for ferrum::{op} (expected ferrum_mps.metal.{op} or ops.*.{op}_mps)")


def op_check(op: str, make_args: Callable[[torch.Generator, Env], Sequence], mutated: Sequence[int] = ()) -> Callable[[Env], float]:
    """Run torch.ops.ferrum.<op> on CPU inputs and its MPS implementation on copies of them on the device.

    `make_args(generator, env)` returns the op's arguments (CPU tensors and plain values); `mutated`
    lists the argument positions the op writes in place (compared too).
    """

    def run(env: Env) -> float:
        args = list(make_args(torch.Generator().manual_seed(0), env))
        dev = [a.clone().to(env.device) if isinstance(a, torch.Tensor) else a for a in args]
        with native.disabled():  # the exact float reference (native CPU kernels quantize activations to int8)
            ref = getattr(torch.ops.ferrum, op)(*args)
        got = device_impl(op)(*dev)
        outs = [x for x in (ref if isinstance(ref, (tuple, list)) else (ref,)) if x is not None]
        gots = [x for x in (got if isinstance(got, (tuple, list)) else (got,)) if x is not None]
        return max_error(gots + [dev[i] for i in mutated], outs + [args[i] for i in mutated])

    return run


# ------------------------------------------------------------------------------------ checks


def _dequantize_args(qt, dtype, g, env):
    rows, cols = env.size(3, 64), cols_for(qt, env)
    return weights(g, qt, rows, cols), int(qt), rows, cols, dtype


def _qlinear_args(qt, dtype, m, g, env):
    n, k = env.size(70, 1000), cols_for(qt, env)
    return randn(g, m, k, dtype=dtype), weights(g, qt, n, k), int(qt), n, k


def _qembedding_args(qt, g, env):
    rows, dim = env.size(13, 300), cols_for(qt, env)
    return torch.tensor([[rows - 1, 0, 5], [5, 5, 1]]), weights(g, qt, rows, dim), int(qt), dim


def _route_args(dtype, experts, k, g, env):
    # Distinct logits exactly representable in bfloat16 (multiples of 1/16 below 16): no ties, whose
    # order legitimately differs (lowest index on MPS, torch.topk's order on the CPU).
    t = env.size(4, 64)
    logits = torch.stack([torch.randperm(experts, generator=g) for _ in range(t)]).float() / 16
    return logits.to(dtype), k, True


def _moe_qlinear_args(qt, dtype, tokens, g, env):
    experts, k = 8, 2
    n, d = env.size(40, 768), cols_for(qt, env)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    return randn(g, tokens, d, dtype=dtype), ids, expert_stack(g, qt, experts, n, d), int(qt), n, d


def _moe_ffn_args(qt, dtype, tokens, g, env):
    experts, k = 8, 2
    h, inter = cols_for(qt, env), cols_for(qt, env)
    x = randn(g, tokens, h, dtype=dtype)
    w, ids = torch.ops.ferrum.moe_route(torch.randn(tokens, experts, generator=g), k, True)
    stacks = [expert_stack(g, qt, experts, inter, h), expert_stack(g, qt, experts, inter, h), expert_stack(g, qt, experts, h, inter)]
    return (x, w, ids, *stacks, int(qt), int(qt), int(qt), inter)


def _rms_norm_args(dtype, g, env):
    h = env.size(256, 2048)
    return randn(g, 3, h, dtype=dtype) * 4, (1 + 0.1 * randn(g, h)).to(dtype), 1e-6


def _add_rms_norm_args(dtype, g, env, pre=False):
    x, w, eps = _rms_norm_args(dtype, g, env)
    args = (x, randn(g, *x.shape, dtype=dtype), w, eps)
    return args + ((1 + 0.1 * randn(g, x.shape[-1])).to(dtype),) if pre else args  # pre_weight: Gemma's sandwich norm


def _qk_norm_rope_cache_args(dtype, interleaved, g, env):
    b, t, hq, hkv, d, s = 1, 2, 4, 2, 64, env.size(16, 256)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=F32) / d)
    pos = torch.tensor([[s - 3, s - 2]])
    return (randn(g, b, t, hq, d, dtype=dtype), randn(g, b, t, hkv, d, dtype=dtype), randn(g, b, t, hkv, d, dtype=dtype),
            (1 + 0.1 * randn(g, d)).to(dtype), (1 + 0.1 * randn(g, d)).to(dtype), 1e-6, inv_freq, pos, interleaved,
            randn(g, b, hkv, s, d, dtype=dtype), randn(g, b, hkv, s, d, dtype=dtype), pos[0].clone())


def _moe_gate_route_args(dtype, experts, k, g, env):
    # Small integers: the router logits are exact in float32 whatever the summation order, so the
    # device and the CPU round them to the same half values and pick the same experts.
    h = env.size(256, 2048)
    x = torch.randint(-2, 3, (env.size(4, 64), h), generator=g).to(dtype)
    w = (torch.randint(-2, 3, (experts, h), generator=g) / 16).to(dtype)
    return x, w, k, True


def _decode_attention_args(dtype, t, s, window, g, env):
    b, hq, hkv, d = 2, 8, 2, 64
    pos = torch.arange(s - t, s)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1, :3] = 0  # left padding of the second sequence
    return (randn(g, b, hq, t, d, dtype=dtype), randn(g, b, hkv, s, d, dtype=dtype), randn(g, b, hkv, s, d, dtype=dtype),
            pos, mask, window, d ** -0.5)


def _qkv_linear_args(dtype, m, g, env):
    n_q, n_kv, k = env.size(64, 1024), env.size(32, 256), env.size(256, 2048)
    return (randn(g, m, k, dtype=dtype), weights(g, Q.Q4_K, n_q, k), int(Q.Q4_K), weights(g, Q.Q4_K, n_kv, k), int(Q.Q4_K),
            weights(g, Q.Q6_K, n_kv, k), int(Q.Q6_K), n_q, n_kv, k)  # Q4_K_M's mix: attn_v in Q6_K


def _gate_up_act_args(dtype, m, qt, act, g, env):
    inter, k = env.size(64, 1536), cols_for(qt, env)
    return randn(g, m, k, dtype=dtype), weights(g, qt, inter, k), int(qt), weights(g, qt, inter, k), int(qt), inter, k, act


# Token counts on both sides of each kernel switch: qlinear's m = 1 mat-vec, 2-8 small batch, > 8
# mat-mat; the MoE ops' mat-vec below moe._MM_MIN_TOKENS and bucketed mat-mat from it on.
QLINEAR_M = {"m=1": 1, "m=5": 5, "m=9": 9}
MOE_TOKENS = {"small": 3, "bucketed": M._MM_MIN_TOKENS + 1}


def _quick(qt=None, dtype=None) -> bool:
    return (qt is None or qt in QUICK_TYPES) and (dtype is None or dtype in (F32, F16))


CHECKS: list[Check] = [
    *[Check(f"dequantize {qt.name} {_DT[dt]}", op_check("dequantize", partial(_dequantize_args, qt, dt)), EXACT, _quick(qt, dt))
      for qt in DEQUANT_TYPES for dt in DTYPES],
    *[Check(f"qlinear {qt.name} {_DT[dt]} {mn}", op_check("qlinear", partial(_qlinear_args, qt, dt, m)), TOL[dt], _quick(qt, dt))
      for qt in QLINEAR_TYPES for dt in DTYPES for mn, m in QLINEAR_M.items()],
    *[Check(f"qembedding {qt.name}", op_check("qembedding", partial(_qembedding_args, qt)), EXACT, _quick(qt))
      for qt in ROWS_TYPES],
    *[Check(f"moe_route {_DT[dt]} E={e} k={k}", op_check("moe_route", partial(_route_args, dt, e, k)), TOL[F32], _quick(None, dt))
      for dt in DTYPES for e, k in ((8, 2), (128, 8))],
    *[Check(f"moe_qlinear {qt.name} {_DT[dt]} {tn}", op_check("moe_qlinear", partial(_moe_qlinear_args, qt, dt, t)), TOL[dt],
            _quick(qt, dt) and qt != Q.Q6_K)
      for qt in MOE_TYPES for dt in DTYPES for tn, t in MOE_TOKENS.items()],
    *[Check(f"moe_ffn {qt.name} {_DT[dt]} {tn}", op_check("moe_ffn", partial(_moe_ffn_args, qt, dt, t)), TOL[dt],
            _quick(qt, dt) and qt != Q.Q6_K)
      for qt in MOE_TYPES for dt in DTYPES for tn, t in MOE_TOKENS.items()],
    # fused decode ops (norm / attention branches)
    *[Check(f"rms_norm {_DT[dt]}", op_check("rms_norm", partial(_rms_norm_args, dt)), TOL[dt], _quick(None, dt)) for dt in DTYPES],
    *[Check(f"add_rms_norm {_DT[dt]}", op_check("add_rms_norm", partial(_add_rms_norm_args, dt)), TOL[dt], _quick(None, dt))
      for dt in DTYPES],
    *[Check(f"add_rms_norm pre_weight {_DT[dt]}", op_check("add_rms_norm", partial(_add_rms_norm_args, dt, pre=True)), TOL[dt],
            _quick(None, dt)) for dt in DTYPES],
    *[Check(f"qk_norm_rope_cache {_DT[dt]} {'interleaved' if il else 'neox'}",
            op_check("qk_norm_rope_cache", partial(_qk_norm_rope_cache_args, dt, il), mutated=(9, 10)), TOL[dt], _quick(None, dt))
      for dt in DTYPES for il in (False, True)],
    *[Check(f"moe_gate_route {_DT[dt]} E={e} k={k}", op_check("moe_gate_route", partial(_moe_gate_route_args, dt, e, k)), TOL[F32],
            _quick(None, dt)) for dt in DTYPES for e, k in ((8, 2), (128, 8))],
    *[Check(f"decode_attention {_DT[dt]} {name}", op_check("decode_attention", partial(_decode_attention_args, dt, t, s, w)),
            TOL[dt], _quick(None, dt))
      for dt in DTYPES for name, t, s, w in (("S=40", 1, 40, 0), ("S=300 window=100 split", 2, 300, 100))],
    *[Check(f"qkv_linear Q4_K/Q6_K {_DT[dt]} m={m}", op_check("qkv_linear", partial(_qkv_linear_args, dt, m)), TOL[dt], _quick(None, dt))
      for dt in DTYPES for m in (1, 4)],
    *[Check(f"gate_up_act {qt.name} {_DT[dt]} {act} m={m}", op_check("gate_up_act", partial(_gate_up_act_args, dt, m, qt, act)),
            TOL[dt], _quick(qt, dt) and m == 1)
      for qt in sorted(FUSED_QTYPES, key=int) for dt in DTYPES for m in (1, 3)
      for act in ("silu",) + (("gelu_pytorch_tanh",) if qt == Q.Q4_K else ())],  # gelu: Gemma's MLP
]


# ------------------------------------------------------------------------------------ running


def select(checks: Sequence[Check], quick: bool, pattern: str | None, bfloat16: bool = True) -> list[Check]:
    """--quick subset, checks whose name contains every word of `pattern`, bfloat16 ones only if supported."""
    words = pattern.split() if pattern else []
    return [c for c in checks
            if (c.quick or not quick) and all(w.lower() in c.name.lower() for w in words)
            and (bfloat16 or "bf16" not in c.name.split())]


def run_checks(checks: Sequence[Check], env: Env, out) -> int:
    """Print one PASS/FAIL line per check; return the number of failures."""
    failed = 0
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        try:
            err, why = c.run(env), ""
        except Exception as e:  # noqa: BLE001 - a crashing kernel or launch is a failed check, named
            err, why = float("nan"), f"  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ok = err <= c.tol  # NaN compares False
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {c.name:<{width}}  max err {err:8.2e}  tol {c.tol:.1e}{why}", file=out, flush=True)
    return failed


# ------------------------------------------------------------------------------------ bandwidth

# Peak unified-memory bandwidth (GB/s) from Apple's specifications. Where a chip comes in two
# memory configurations the higher one is listed (M3 Max 14-core CPU: 300, M4 Max 14-core: 410).
PEAK_GBPS = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "M5": 153,
}


def chip_name() -> str | None:
    try:
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return brand.strip() or None


def peak_bandwidth(brand: str | None) -> float | None:
    m = re.fullmatch(r"Apple (M\d+(?: (?:Pro|Max|Ultra))?)", (brand or "").strip())
    return PEAK_GBPS.get(m.group(1)) if m else None


def _timed(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Seconds per call of fn on the GPU queue: warm up, synchronize, time `reps` calls, synchronize."""
    for _ in range(warmup):
        fn()
    torch.mps.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.mps.synchronize()
    return (time.perf_counter() - t0) / reps


def _tiled(qt: Q, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """rows x cols of valid blocks quickly: 64 quantized rows repeated (bandwidth does not depend on values)."""
    tile = weights(g, qt, 64, cols)
    return tile.repeat(-(-rows // 64), 1)[:rows].contiguous()


# Mat-vec bandwidth: weights of ~96 MB each, two of them alternated, so every call streams from DRAM
# (bigger than any Apple chip's system-level cache) and runs long enough (~0.2 ms at 400 GB/s)
# that the host's per-call launch cost (tens of us) stays hidden behind the GPU.
MATVEC_TYPES = (Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_MATVEC_BYTES, _MATVEC_COLS = 96 << 20, 4096


def matvec_bandwidth(env: Env, out, peak: float | None, dtypes=(F16, BF16)) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"{'mat-vec (m=1)':<32} {'MB/call':>8} {'us/call':>9} {'GB/s':>7} {'of peak':>8}", file=out)
    for qt in MATVEC_TYPES:
        rows = _MATVEC_BYTES // quants.row_nbytes(qt, _MATVEC_COLS)
        ws = [_tiled(qt, rows, _MATVEC_COLS, g).to(env.device) for _ in range(2)]
        for dt in dtypes:
            x = torch.randn(1, _MATVEC_COLS, generator=g).to(dt).to(env.device)
            state = [0]

            def call():
                state[0] ^= 1
                return torch.ops.ferrum.qlinear(x, ws[state[0]], int(qt), rows, _MATVEC_COLS)

            s = _timed(call, reps=40)
            _bandwidth_line(f"{qt.name} {rows}x{_MATVEC_COLS} {_DT[dt]}", ws[0].numel(), s, peak, out)
        del ws


def decode_step_bandwidth(env: Env, out, peak: float | None) -> None:
    """One generated token of a synthetic 1-layer Qwen3-MoE with Qwen3-30B-A3B's dimensions, eager."""
    from .gguf_file import read_gguf
    from .loading import load_model
    from .testing import synthetic as S

    cfg = S.qwen3_30b_a3b_config(num_hidden_layers=1, full_vocab=False)
    # Written once under ~/.cache/ferrum_mps/synthetic; rows and experts repeat (same sizes and compute).
    path = S.synthetic_gguf(cfg, unique_rows=64, unique_experts=2).path
    print(f"decode step model: {path} ({path.stat().st_size / 2**20:.0f} MiB, written once)", file=out, flush=True)
    model = load_model(path, device=env.device, progress=False)
    tensors = read_gguf(path).tensors
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    embd = tensors["token_embd.weight"]
    nbytes = sum(t.nbytes * (k / e if "_exps." in n else 1) for n, t in tensors.items() if n != "token_embd.weight")
    nbytes += embd.nbytes / embd.shape[0]  # one embedding row per token
    prompt = 16
    cache = model.static_cache(1, prompt + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt + 1), generator=torch.Generator().manual_seed(0)).to(env.device)
    pos = torch.arange(prompt + 1, device=env.device)
    with torch.inference_mode():
        model.decode_step(ids[:, :prompt], cache, pos[:prompt])
        s = _timed(lambda: model.decode_step(ids[:, prompt:], cache, pos[prompt:]), reps=20)
    print(f"{'decode step':<32} {'MB/token':>8} {'us/token':>9} {'GB/s':>7} {'of peak':>8}", file=out)
    _bandwidth_line(f"Qwen3-30B-A3B layer {_DT[model.dtype]}", nbytes, s, peak, out)
    print(f"  (1 layer of 48: embedding row, attention, router, {k} of {e} experts, a {cfg.vocab_size}-token head;"
          f" eager decode_step on a StaticCache)", file=out)


def _bandwidth_line(what: str, nbytes: float, seconds: float, peak: float | None, out) -> None:
    gbps = nbytes / seconds / 1e9
    share = f"{100 * gbps / peak:7.0f}%" if peak else f"{'?':>8}"
    print(f"  {what:<30} {nbytes / 1e6:8.1f} {seconds * 1e6:9.0f} {gbps:7.1f} {share}", file=out, flush=True)


# ------------------------------------------------------------------------------------ command


def _harness_compiler():
    from .testing.metal_sim import compile_shader

    return compile_shader


def _bfloat16_on(device: torch.device) -> bool:
    try:
        torch.ones(1, dtype=BF16, device=device) + 1
        return True
    except (RuntimeError, TypeError):
        return False


def run(args: argparse.Namespace, out=sys.stdout, compiler: Callable | None = None) -> int:
    """The selftest; `compiler` replaces the shader compiler (tests corrupt kernels through it)."""
    mps = torch.backends.mps.is_available() and not args.harness
    env = Env(torch.device("mps" if mps else "cpu"), harness=not mps)
    if mps:
        brand = chip_name()
        print(f"ferrum-mps selftest on {brand or 'an unknown Apple chip'} (MPS, torch {torch.__version__})", file=out)
    else:
        why = "--harness given" if args.harness else "no MPS device on this machine"
        print(f"ferrum-mps selftest: {why}: running the Metal kernels under the Metal-on-CPU harness "
              f"(ferrum_mps.testing.metal_sim) on CPU tensors with small shapes", file=out)
    if compiler is None:
        try:
            compiler = torch.mps.compile_shader if mps else _harness_compiler()
        except Exception as e:  # noqa: BLE001 - e.g. metal_sim's CompilerNotFound
            print(f"error: cannot run the Metal-on-CPU harness: {e}", file=out)
            return 1
    bf16 = _bfloat16_on(env.device)
    checks = select(CHECKS, args.quick, args.k, bfloat16=bf16)
    if not bf16:
        print("bfloat16 is not supported on this device (MPS needs macOS 14): bfloat16 checks skipped", file=out)
    if not checks:
        print(f"no check matches -k {args.k!r}", file=out)
        return 1
    t0 = time.perf_counter()
    with shaders.use_shader_compiler(compiler):
        failed = run_checks(checks, env, out)
        print(f"{len(checks) - failed} of {len(checks)} checks passed, {failed} failed "
              f"({'MPS' if mps else 'harness'}, {time.perf_counter() - t0:.0f} s)", file=out, flush=True)
        if not mps:
            print("bandwidth: skipped (no GPU: harness timings say nothing about a Mac)", file=out)
        elif args.no_bandwidth:
            print("bandwidth: skipped (--no-bandwidth)", file=out)
        else:
            peak = peak_bandwidth(brand)
            print(f"bandwidth: peak of this chip {f'{peak:.0f} GB/s' if peak else 'unknown'}", file=out)
            try:
                matvec_bandwidth(env, out, peak, DTYPES[1:] if bf16 else DTYPES[1:2])
                decode_step_bandwidth(env, out, peak)
            except Exception as e:  # noqa: BLE001 - a measurement, not a check: report it, keep the checks' verdict
                print(f"bandwidth: failed: {type(e).__name__}: {e}", file=out)
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="check every Metal kernel against the CPU ops; GPU bandwidth on a Mac")
    p.add_argument("--quick", action="store_true", help=f"a subset: quant types {', '.join(q.name for q in QUICK_TYPES)}; float32/float16")
    p.add_argument("-k", metavar="WORDS", help="only checks whose name contains every word, e.g. -k 'qlinear Q4_K'")
    p.add_argument("--harness", action="store_true", help="use the Metal-on-CPU harness even when MPS is available")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurements")
    p.set_defaults(func=run)
