"""Native CPU kernels for the quantized ops (qlinear, qembedding, moe_qlinear/moe_ffn).

The C++ source (qkernels.cpp, shipped with the package) is compiled on first use into
~/.cache/ferrum_mps/native/, one library per source hash, compiler and instruction-set
level, and loaded with ctypes (ctypes releases the GIL during each call; the library runs
its own small thread pool sized by torch.get_num_threads(), or by the count `owning_threads()` saved).

Instruction-set levels are picked from the CPU's advertised flags, never -march=native:
this kind of machine advertises AMX/AVX-512 that a native build used and then died on
(SIGILL). A freshly built library is first exercised in a subprocess; if that fails, the
next lower level is tried, and without any working library the ops keep their torch
implementations (a logging warning says why).

Activations are quantized to int8 as llama.cpp does (per 32 values for the 32-value block formats,
per 256 for the K-quants), so products differ from the exact float reference by 5.5e-3 (32-value
formats) to 7-8e-3 (K-quants) relative; `set_enabled(False)` / `disabled()` switch every op back to
that reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

from ..default_model import cache_dir as _ferrum_cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "qkernels.cpp"
QTYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

__all__ = ["QTYPES", "available", "enabled", "set_enabled", "disabled", "status", "isa_levels", "threads",
           "owning_threads",
           "qmatmul", "moe_matmul", "get_rows", "qk_norm_rope_cache", "add_rms_norm", "rms_norm", "act_mul",
           "decode_attention", "moe_route", "moe_combine", "Plan", "plan_layout"]

# The process-wide default (set_enabled) and a per-thread/per-task override (disabled()): one
# thread's `with disabled():` must not change the numerics of another (a server's model thread).
_default = [True]
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("ferrum_native_override", default=None)
_lock = threading.Lock()
_lib: dict = {}  # "lib": ctypes.CDLL | None, "why": str, "isa": str


class BuildError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- switch


def set_enabled(flag: bool) -> bool:
    """Use the native kernels (True, the default) or the exact float torch reference (False) in
    every thread that is not inside `disabled()`; returns the previous setting."""
    before, _default[0] = _default[0], bool(flag)
    return before


def enabled() -> bool:
    o = _override.get()
    return _default[0] if o is None else o


@contextlib.contextmanager
def disabled():
    """`with native.disabled():` runs the ops of this thread (or asyncio task) on their exact float
    torch reference; other threads keep the process-wide setting."""
    token = _override.set(False)
    try:
        yield
    finally:
        _override.reset(token)


# ---------------------------------------------------------------------------- threads
#
# torch's OpenMP workers spin for milliseconds after each parallel torch op; on a machine with as many
# cores as threads they then hold the cores the native pool's workers need. Measured on this 2-core
# machine, Gemma-3-270M prefill of 64 tokens: 146 ms with both at 2 threads, 143 ms with both at 1,
# 90 ms with torch at 1 and the native pool at 2. So a CPU forward or generate() runs inside
# `owning_threads()`: torch's own ops (a few percent of the time) single-threaded, the native kernels on
# every thread torch was given.

_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar("ferrum_native_threads", default=None)


def threads() -> int:
    """Threads the native kernels use: torch's intra-op count, or the one `owning_threads()` saved."""
    n = _threads.get()
    return torch.get_num_threads() if n is None else n


@contextlib.contextmanager
def owning_threads():
    """Give the cores to the native kernels: torch's intra-op threads are set to 1 for the block (a
    process-wide setting, restored after it) and the native pool keeps torch's previous count. Does
    nothing when the native kernels are disabled or unavailable, or inside another such block."""
    n = torch.get_num_threads()
    if _threads.get() is not None or n <= 1 or not enabled() or not available():
        yield
        return
    token = _threads.set(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _threads.reset(token)


# ---------------------------------------------------------------------------- compiler and ISA


@lru_cache(maxsize=None)
def _toolchain() -> tuple[list[str], bool]:
    """(argv of a C++ compiler, is zig): the `ziglang` package's clang, else a system c++."""
    try:
        import ziglang

        zig = Path(ziglang.__file__).parent / "zig"
        if zig.exists():
            return [str(zig), "c++"], True
    except ImportError:
        pass
    for name in ("c++", "clang++", "g++"):
        exe = shutil.which(name)
        if exe:
            return [exe], False
    raise BuildError("no C++ compiler: `pip install ziglang` (a dependency of ferrum-mps) or install clang/g++")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
    return set(m.group(2).split()) if m else set()


_V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"}  # x86-64-v4 + VNNI


def isa_levels() -> list[str]:
    """Instruction-set levels this CPU can run, best first; the last one always works."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        return (["x86-64-v4"] if _V4 <= flags else []) + (["x86-64-v3"] if _V3 <= flags else []) + ["x86-64"]
    if machine in ("arm64", "aarch64"):
        dot = platform.system() == "Darwin" or "asimddp" in _cpu_flags()  # every Apple arm64 CPU has dotprod
        return (["armv8.2-a+dotprod"] if dot else []) + ["armv8-a"]
    return ["generic"]


def _target_flags(isa: str, zig: bool) -> list[str]:
    if zig:
        return {"x86-64-v4": ["-mcpu=x86_64_v4+avx512vnni"], "x86-64-v3": ["-mcpu=x86_64_v3"], "x86-64": ["-mcpu=baseline"],
                "armv8.2-a+dotprod": ["-mcpu=generic+v8_2a+dotprod+fullfp16"], "armv8-a": ["-mcpu=generic"],
                "generic": ["-mcpu=baseline"]}[isa]
    if isa == "x86-64-v4":
        return ["-march=x86-64-v4", "-mavx512vnni"]
    if isa.startswith("x86-64"):
        return [f"-march={isa}"]
    return [] if isa == "generic" else [f"-march={isa}"]


def _build(isa: str) -> Path:
    argv, zig = _toolchain()
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fno-exceptions", "-fno-rtti", "-fvisibility=hidden",
             "-ffp-contract=off"] + _target_flags(isa, zig)
    flags += ["-nostdlib++"] if zig else []
    flags += ["-lpthread"] if platform.system() != "Darwin" else []
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(argv + flags).encode() + platform.machine().encode()).hexdigest()[:16]
    d = _ferrum_cache_dir() / "native"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"qkernels-{isa.replace('+', '_')}-{key}.so"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    r = subprocess.run(argv + flags + [str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"compiling {SOURCE.name} for {isa} failed:\n{r.stderr.strip()[-2000:]}")
    # Run the library once in a child process: an instruction the CPU lacks kills the child, not us.
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL({str(tmp)!r}).fm_selftest())"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"the {isa} build fails its self-test in a subprocess (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    os.replace(tmp, out)
    return out


def _load() -> ctypes.CDLL | None:
    if "lib" in _lib:
        return _lib["lib"]
    with _lock:
        if "lib" in _lib:
            return _lib["lib"]
        errors = []
        lib = None
        for isa in isa_levels():
            try:
                lib = ctypes.CDLL(str(_build(isa)))
                _declare(lib)
                _lib.update(isa=isa, why="")
                break
            except (BuildError, OSError, subprocess.SubprocessError, AttributeError) as e:
                errors.append(f"{isa}: {e}")
                lib = None
        if lib is None:
            _lib["why"] = "; ".join(errors)
            log.warning("ferrum_mps native CPU kernels unavailable, using the torch implementation: %s", _lib["why"])
        _lib["lib"] = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.fm_qmatmul.argtypes = [i32, p, i64, i64, p, i64, p, i32]
    lib.fm_moe_matmul.argtypes = [i32, p, i64, i64, i64, p, i64, p, i64, i64, i32, p, i32]
    lib.fm_get_rows.argtypes = [i32, p, i64, p, i64, p, i32]
    f32 = ctypes.c_float
    lib.fm_qk_norm_rope_cache.argtypes = [p, p, p, i64, i64, i64, p, p, f32, p, i64, i32, p, p, i64, i64, p]
    lib.fm_add_rms_norm.argtypes = [p, p, p, p, f32, i64, i64, p, p, i32]
    lib.fm_rms_norm.argtypes = [p, p, f32, i64, i64, p, i32]
    lib.fm_act_mul.argtypes = [i32, p, p, i64, p, i32]
    lib.fm_decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, i64, f32, p, i32]
    lib.fm_moe_route.argtypes = [p, p, i64, i64, i64, i64, i32, p, p, i32]
    lib.fm_moe_combine.argtypes = [p, p, i64, i64, i64, p, i32]
    lib.fm_plan_run.argtypes = [p, i64, i64, i64, i32]
    lib.fm_plan_layout.restype = ctypes.c_char_p
    for f in (lib.fm_qmatmul, lib.fm_moe_matmul, lib.fm_get_rows, lib.fm_qk_norm_rope_cache, lib.fm_add_rms_norm,
              lib.fm_rms_norm, lib.fm_act_mul, lib.fm_decode_attention, lib.fm_moe_route, lib.fm_moe_combine,
              lib.fm_plan_run):
        f.restype = ctypes.c_int
    if lib.fm_abi_version() != 5:
        raise OSError("stale native library (ABI version mismatch)")


def library_for(isa: str) -> ctypes.CDLL:
    """The library built for one instruction-set level (tests run the portable code this way)."""
    lib = ctypes.CDLL(str(_build(isa)))
    _declare(lib)
    return lib


def available() -> bool:
    """True when the native library is built and loaded (builds it on first call)."""
    return _load() is not None


def status() -> dict:
    """{'available', 'enabled', 'isa', 'why'}: what the ops will use and why."""
    ok = available()
    return {"available": ok, "enabled": enabled(), "isa": _lib.get("isa") if ok else None, "why": _lib.get("why", "")}


def _active(qt) -> ctypes.CDLL | None:
    """The library when native kernels should serve this qtype now, else None."""
    if not enabled() or qt not in QTYPES:
        return None
    return _load()


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"native {what} failed (code {rc})")


# ---------------------------------------------------------------------------- calls
#
# Each returns None when the native path does not apply (disabled, unsupported qtype,
# library unavailable): the caller then runs its torch implementation.


def qmatmul(xf: torch.Tensor, raw: torch.Tensor, qt, n: int, k: int) -> torch.Tensor | None:
    """xf float32 contiguous [m, k] @ W.T -> float32 [m, n]; raw: n contiguous GGML rows."""
    lib = _active(qt)
    if lib is None or k % 32:
        return None
    m = xf.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    if m and n:
        _check(lib.fm_qmatmul(int(qt), raw.data_ptr(), n, k, xf.data_ptr(), m, out.data_ptr(), threads()),
               "qmatmul")
    return out


def moe_matmul(x: torch.Tensor, ids32: torch.Tensor, raw: torch.Tensor, qt, n: int, k: int, per_slot: bool) -> torch.Tensor | None:
    """Per (token, slot) pair p: x row (p if per_slot else p // top_k) @ W[ids[p]].T -> float32 [pairs, n].

    x: float32 contiguous [rows, k]; ids32: int32 contiguous [T, top_k], values in [0, E)
    (any other id, e.g. NO_EXPERT = -1, selects nothing: that pair's row is zeros);
    raw: contiguous expert stack [E, n, row bytes].
    """
    lib = _active(qt)
    if lib is None or k % 32:
        return None
    P = ids32.numel()
    out = torch.empty((P, n), dtype=torch.float32)
    if P and n:
        _check(lib.fm_moe_matmul(int(qt), raw.data_ptr(), raw.shape[0], n, k, x.data_ptr(), x.shape[0],
                                 ids32.data_ptr(), P, ids32.shape[1], int(per_slot), out.data_ptr(),
                                 threads()), "moe_matmul")
    return out


def get_rows(raw: torch.Tensor, qt, dim: int, ids64: torch.Tensor) -> torch.Tensor | None:
    """Rows ids64 (int64 contiguous, in range) of a GGML table as float32 [len(ids), dim]."""
    lib = _active(qt)
    if lib is None or dim % 32:
        return None
    out = torch.empty((ids64.numel(), dim), dtype=torch.float32)
    if ids64.numel():
        _check(lib.fm_get_rows(int(qt), raw.data_ptr(), dim, ids64.data_ptr(), ids64.numel(), out.data_ptr(),
                               threads()), "get_rows")
    return out


def _float32_lib(*ts) -> ctypes.CDLL | None:
    """The library when enabled and every tensor is a float32 CPU tensor, else None."""
    if not enabled() or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in ts):
        return None
    return _load()


def qk_norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, eps, inv_freq, position, interleaved, k_cache, v_cache,
                       slot) -> torch.Tensor | None:
    """ferrum::qk_norm_rope_cache for one float32 token (B = T = 1), arguments already checked by the op;
    position and slot are ints. Returns q rotated [1, Hq, 1, D], or None when the native path does not apply
    (disabled, unavailable, not all float32, caches not contiguous)."""
    ts = (q, k, v, inv_freq, k_cache, v_cache) + tuple(w for w in (q_norm_weight, k_norm_weight) if w is not None)
    lib = _float32_lib(*ts)
    if lib is None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    _, _, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    q, k, v, inv_freq = q.contiguous(), k.contiguous(), v.contiguous(), inv_freq.contiguous()
    qw = q_norm_weight.contiguous() if q_norm_weight is not None else None
    kw = k_norm_weight.contiguous() if k_norm_weight is not None else None
    out = torch.empty((1, Hq, 1, D), dtype=torch.float32)
    _check(lib.fm_qk_norm_rope_cache(q.data_ptr(), k.data_ptr(), v.data_ptr(), Hq, Hkv, D,
                                     qw.data_ptr() if qw is not None else None, kw.data_ptr() if kw is not None else None,
                                     eps, inv_freq.data_ptr(), position, int(interleaved), k_cache.data_ptr(),
                                     v_cache.data_ptr(), S, slot, out.data_ptr()), "qk_norm_rope_cache")
    return out


def add_rms_norm(x, residual, weight, eps, pre_weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ferrum::add_rms_norm when everything is float32 (arguments already checked by the op), else None."""
    lib = _float32_lib(x, residual, weight, *(() if pre_weight is None else (pre_weight,)))
    if lib is None or x.shape != residual.shape:
        return None
    H = x.shape[-1]
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    pre = pre_weight.contiguous() if pre_weight is not None else None
    normed, s = torch.empty_like(x), torch.empty_like(x)
    _check(lib.fm_add_rms_norm(x.data_ptr(), residual.data_ptr(), pre.data_ptr() if pre is not None else None,
                               weight.data_ptr(), eps, x.numel() // H if H else 0, H, normed.data_ptr(), s.data_ptr(),
                               threads()),
           "add_rms_norm")
    return normed, s


def rms_norm(x, weight, eps) -> torch.Tensor | None:
    """ferrum::rms_norm on float32 (arguments already checked by the op), else None."""
    lib = _float32_lib(x, weight)
    if lib is None:
        return None
    H = x.shape[-1]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    _check(lib.fm_rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.numel() // H if H else 0, H, out.data_ptr(),
                           threads()), "rms_norm")
    return out


def act_mul(act: str, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """act(g) * u for float32 g, u of one shape (act: a name in plan_layout()'s activations), else None."""
    lib = _float32_lib(g, u)
    if lib is None or g.shape != u.shape:
        return None
    acts = plan_layout()[1]
    if act not in acts:
        return None
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    _check(lib.fm_act_mul(acts.index(act), g.data_ptr(), u.data_ptr(), g.numel(), out.data_ptr(), threads()), "act_mul")
    return out


def decode_attention(q, k_cache, v_cache, lo: int, hi: int, scale: float) -> torch.Tensor | None:
    """One query per batch row and head, q [B, Hq, 1, D], over cache slots [lo, hi) of k/v_cache [B, Hkv, S, D]
    (float32) -> [B, 1, Hq * D]; None when the native path does not apply."""
    lib = _float32_lib(q, k_cache, v_cache)
    if lib is None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    B, Hq, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    out = torch.empty((B, 1, Hq * D), dtype=torch.float32)
    _check(lib.fm_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), B, Hq, Hkv, D, S, lo, hi,
                                   scale, out.data_ptr(), threads()), "decode_attention")
    return out


def moe_route(x, router_weight, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ferrum::moe_gate_route on float32 x [T, H] and router [E, H] (checked by the op), else None."""
    lib = _float32_lib(x, router_weight)
    if lib is None or top_k > 16:
        return None
    x, r = x.contiguous(), router_weight.contiguous()
    T, H = x.shape
    w = torch.empty((T, top_k), dtype=torch.float32)
    ids = torch.empty((T, top_k), dtype=torch.int32)
    _check(lib.fm_moe_route(x.data_ptr(), r.data_ptr(), T, H, r.shape[0], top_k, int(normalize), w.data_ptr(),
                            ids.data_ptr(), threads()), "moe_route")
    return w, ids


def moe_combine(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """sum over slots of weights [T, k] * y [T, k, H] -> [T, H] (float32), else None."""
    lib = _float32_lib(weights, y)
    if lib is None:
        return None
    T, k, H = y.shape
    weights, y = weights.contiguous(), y.contiguous()
    out = torch.empty((T, H), dtype=torch.float32)
    _check(lib.fm_moe_combine(weights.data_ptr(), y.data_ptr(), T, k, H, out.data_ptr(), threads()), "moe_combine")
    return out


# ---------------------------------------------------------------------------- decode plans


@lru_cache(maxsize=None)
def plan_layout() -> tuple[dict, tuple[str, ...], int, int]:
    """({op name: (code, int fields, float fields)}, activation names, ints, floats) as qkernels.cpp
    declares them (fm_plan_layout): the one description of a plan step both sides read."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_lib.get('why')}")
    lines = lib.fm_plan_layout().decode().strip().splitlines()
    head = lines[0].split()
    n_ints, n_floats = int(head[1]), int(head[3])
    acts = tuple(lines[1].split()[1:])
    ops = {}
    for line in lines[2:]:
        ints, _, floats = line.partition("|")
        code, name, *fields = ints.split()
        ops[name] = (int(code), tuple(fields), tuple(floats.split()))
    return ops, acts, n_ints, n_floats


class Plan:
    """Native steps run in order by one call per token (`fm_plan_run`): a model's decode step on CPU.

    `add(op, **fields)` takes the fields qkernels.cpp's PLAN_LAYOUT names: tensors (their data
    pointers; the plan keeps them alive), ints, None (a null pointer) and floats. The caller checks
    shapes, dtypes (float32) and contiguity: the C++ side trusts the pointers.
    """

    def __init__(self):
        self._ints: list[list[int]] = []  # per step: the op code, then its int fields
        self._floats: list[list[float]] = []
        self._keep: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None

    def add(self, op: str, **fields) -> None:
        ops, acts, n_ints, n_floats = plan_layout()
        code, int_names, float_names = ops[op]
        unknown = set(fields) - set(int_names) - set(float_names)
        if unknown:
            raise KeyError(f"plan op {op} has no field(s) {sorted(unknown)}")
        ints = [0] * n_ints
        for i, name in enumerate(int_names):
            v = fields.get(name)
            if isinstance(v, torch.Tensor):
                self._keep.append(v)
                v = v.data_ptr()
            elif name == "act" and isinstance(v, str):
                v = acts.index(v)
            ints[i] = int(v or 0)
        self._ints.append([code, *ints])
        self._floats.append([float(fields.get(name, 0.0)) for name in float_names] + [0.0] * (n_floats - len(float_names)))
        self._table = None

    def __len__(self) -> int:
        return len(self._ints)

    def run(self, position: int, slot: int) -> None:
        if self._table is None:  # PlanStep rows: int64 code and ints, then the float64 fields' bits
            floats = torch.tensor(self._floats, dtype=torch.float64).view(torch.int64)
            self._table = torch.cat([torch.tensor(self._ints, dtype=torch.int64), floats], 1).contiguous()
        _check(_load().fm_plan_run(self._table.data_ptr(), len(self._ints), position, slot, threads()), "plan")
