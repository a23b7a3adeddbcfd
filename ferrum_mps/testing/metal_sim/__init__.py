"""Run Metal compute kernels on the CPU, behind torch.mps.compile_shader's calling convention.

    from ferrum_mps.testing.metal_sim import compile_shader
    lib = compile_shader(source)                 # MSL source, as for torch.mps.compile_shader
    lib.my_kernel(out, x, n, threads=[256, rows], group_size=[256, 1])

CPU tensors stand in for MPS tensors. The source is translated to C++, compiled by clang
(the `ziglang` package, a system clang >= 16, or FERRUM_METAL_SIM_CXX) and cached; each
threadgroup's threads run as cooperative fibers so barriers and simd operations behave
as on the GPU. Where MPS would silently misbehave (a non-contiguous tensor, an int bound
to a `constant float&`, an out-of-bounds access) this raises instead.

Limits (what fibers on a CPU cannot show): races and memory ordering between threads,
the hardware's simdgroup-matrix lane layout, fast-math/fma differences, speed. Vector
comparisons give clang masks (-1/0 ints), not Metal bool vectors: `select`, `all`, `any`
and conversions written around the comparison (`float4(a < b)`) behave as in Metal, but
`bool4 m = a < b;` does not compile and arithmetic on a stored mask sees -1. A simd operation inside a helper function called from both branches
of a divergent `if` sees the lanes of both branches (call sites are source positions).
"""

from __future__ import annotations

import ctypes
import operator
import re
import threading
from typing import Any

import torch

from .compiler import CompilerNotFound, build_kernel, runtime_library, translate_source
from .translate import MetalTranslationError

__all__ = ["compile_shader", "MetalSimError", "MetalLibrary", "MetalKernel", "CompilerNotFound", "MetalTranslationError"]


class MetalSimError(RuntimeError):
    """A kernel failed at run time (out-of-bounds access, barrier misuse, ...)."""


class _ArgInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("is_ptr", "is_const", "kind", "elem_size", "nelem", "size")]


class _Entry(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("thunk", ctypes.c_void_p),
        ("info", ctypes.POINTER(_ArgInfo)),
        ("buffer_index", ctypes.POINTER(ctypes.c_int)),
        ("nbuf", ctypes.c_int),
        ("max_threads", ctypes.c_int),
    ]


class _Region(ctypes.Structure):
    _fields_ = [
        ("map", ctypes.c_void_p),
        ("maplen", ctypes.c_uint64),
        ("data", ctypes.c_void_p),
        ("size", ctypes.c_uint64),
        ("label", ctypes.c_char_p),
    ]


_KIND_NAMES = {0: "signed integer", 1: "unsigned integer", 2: "half/float", 3: "struct", 4: "bool", 5: "bfloat"}
_DTYPE_KIND = {
    torch.float32: (2, 4), torch.float16: (2, 2), torch.bfloat16: (5, 2), torch.float64: (2, 8),
    torch.int64: (0, 8), torch.int32: (0, 4), torch.int16: (0, 2), torch.int8: (0, 1),
    torch.uint8: (1, 1), torch.bool: (4, 1),
}
for _name, _size in (("uint16", 2), ("uint32", 4), ("uint64", 8)):
    if hasattr(torch, _name):
        _DTYPE_KIND[getattr(torch, _name)] = (1, _size)
_CASTS = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_rt = None
_rt_lock = threading.Lock()
_dispatch_lock = threading.RLock()


def _runtime() -> ctypes.CDLL:
    global _rt
    with _rt_lock:
        if _rt is None:
            rt = ctypes.CDLL(str(runtime_library()))
            rt.msl_api.restype = ctypes.c_void_p
            rt.msl_dispatch.restype = ctypes.c_int
            rt.msl_dispatch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint32),
                                        ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_Region), ctypes.c_int,
                                        ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
            rt.msl_guarded_alloc.restype = ctypes.c_void_p
            rt.msl_guarded_alloc.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_void_p),
                                             ctypes.POINTER(ctypes.c_uint64)]
            rt.msl_guarded_free.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
            _rt = rt
        return _rt


def compile_shader(
    source: str, *, bounds_check: bool = True, check_address_spaces: bool = True, timeout: float = 300
) -> "MetalLibrary":
    """Compile MSL `source` into a library whose kernels run on CPU tensors.

    bounds_check: every buffer is copied into its own mapping flanked by inaccessible
    pages, so an access past its end raises MetalSimError naming the kernel, thread and
    argument (instead of silently reading a neighbour or crashing).
    check_address_spaces: type-check device/threadgroup/constant like the Metal compiler
    (a separate clang pass, cached with the library).
    timeout: CPU seconds after which a launch is aborted (an endless loop raises).
    """
    if not isinstance(source, str):
        raise TypeError(f"compile_shader expects the Metal source as str, got {type(source).__name__}")
    try:
        source.encode("ascii")
    except UnicodeEncodeError as e:
        raise SyntaxError(f"Metal source must be pure ASCII (compile_shader rejects others): {e}") from None
    lib = MetalLibrary(source, bounds_check=bounds_check, check_address_spaces=check_address_spaces)
    lib.timeout = max(1, int(timeout))
    return lib


class MetalLibrary:
    """Kernels are compiled on first lookup, each into its own cached shared library."""

    def __init__(self, source: str, *, bounds_check: bool = True, check_address_spaces: bool = True):
        self._key, meta = translate_source(source, check=check_address_spaces)
        self._meta = {m["host"]: m for m in meta["entries"]}
        self._tg_names = meta.get("tg_names", [])
        self._kernels: dict[str, tuple] = {}
        self.bounds_check = bounds_check
        self.timeout = 300

    def _load(self, name: str):
        got = self._kernels.get(name)
        if got is None:
            rt = _runtime()
            m = self._meta[name]
            dll = ctypes.CDLL(str(build_kernel(self._key, m)))
            ctypes.c_void_p.in_dll(dll, "__msl_api").value = rt.msl_api()
            table = (_Entry * 1).in_dll(dll, "__msl_entries")
            got = (dll, table[0], m)
            self._kernels[name] = got
        return got

    def __getattr__(self, name: str) -> "MetalKernel":
        if name.startswith("_") or name in ("bounds_check", "timeout"):
            raise AttributeError(name)
        if name not in self._meta:
            raise AttributeError(f"no kernel named {name!r} in this library (kernels: {sorted(self._meta)})")
        dll, e, m = self._load(name)
        return MetalKernel(self, name, e, m)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._meta))


class MetalKernel:
    thread_execution_width = 32

    def __init__(self, lib: MetalLibrary, name: str, entry: _Entry, meta: dict):
        self._lib, self.name, self._entry = lib, name, entry
        self.max_threads_per_threadgroup = entry.max_threads
        self._params = {}  # buffer index -> (param meta, _ArgInfo)
        for k in range(entry.nbuf):
            self._params[entry.buffer_index[k]] = None
        bufparams = [p for p in meta["params"] if p["builtin"] is None]
        for k, p in enumerate(bufparams):
            self._params[p["buffer"]] = (p, entry.info[k])
        self._nbuf = max(self._params) + 1 if self._params else 0

    def __repr__(self):
        return f"<metal_sim kernel {self.name}>"

    # ---- argument binding -------------------------------------------------------------
    def _param(self, i: int):
        got = self._params.get(i)
        if got is None:
            raise ValueError(f"kernel {self.name}: argument {i} has no [[buffer({i})]] parameter to bind to")
        return got

    def _describe(self, p: dict, i: int) -> str:
        return f"argument {i} (`{p['type']} {p['name']}` [[buffer({i})]])"

    def _check_tensor(self, i: int, t: torch.Tensor) -> None:
        p, info = self._param(i)
        if t.device.type != "cpu":
            raise ValueError(f"kernel {self.name}: {self._describe(p, i)} is on {t.device}; metal_sim runs CPU tensors")
        if not t.is_contiguous():
            raise ValueError(
                f"kernel {self.name}: {self._describe(p, i)} is not contiguous (shape {tuple(t.shape)}, "
                f"stride {t.stride()}); compile_shader ignores strides: pass .contiguous()"
            )
        if not info.is_ptr and info.kind != 3:
            raise TypeError(f"kernel {self.name}: a tensor is bound to the scalar reference {self._describe(p, i)}")
        if info.kind in (3,) or info.size == 0:
            return
        kind, size = _DTYPE_KIND.get(t.dtype, (None, None))
        same_class = kind == info.kind or ({kind, info.kind} <= {0, 1}) or ({kind, info.kind} <= {0, 1, 4} and size == 1)
        if not same_class or size != info.elem_size:
            raise TypeError(
                f"kernel {self.name}: {t.dtype} tensor bound to {self._describe(p, i)}, whose elements are "
                f"{info.elem_size}-byte {_KIND_NAMES[info.kind]}s (MPS would reinterpret the bytes)"
            )

    def _scalar_bytes(self, i: int, v: Any, cast: str | None) -> bytes:
        p, info = self._param(i)
        if isinstance(v, (list, tuple)):
            if not v:
                raise ValueError(f"kernel {self.name}: empty list for {self._describe(p, i)}")
            dtype = torch.float32 if isinstance(v[0], float) else torch.int64
            if cast:
                dtype = _CASTS[cast]
            arr = torch.tensor(list(v), dtype=dtype)
            kind, size = _DTYPE_KIND[dtype]
            ok_kind = kind == info.kind or {kind, info.kind} <= {0, 1} or info.kind == 3
            if not ok_kind or (info.kind != 3 and size != info.elem_size):
                raise TypeError(
                    f"kernel {self.name}: a list of {dtype} is bound to {self._describe(p, i)} "
                    f"({info.elem_size}-byte {_KIND_NAMES[info.kind]} elements)"
                )
            if not info.is_ptr and info.size > arr.numel() * size:
                raise ValueError(f"kernel {self.name}: {arr.numel()} values are too few for {self._describe(p, i)}")
            return arr.numpy().tobytes()
        if isinstance(v, bool) or isinstance(v, int):
            dtype = torch.int64
        elif isinstance(v, float):
            dtype = torch.float32
        else:
            raise TypeError(f"kernel {self.name}: cannot bind {type(v).__name__} to {self._describe(p, i)}")
        if cast is not None:
            if cast not in _CASTS:
                raise ValueError(f"kernel {self.name}: unknown arg_casts type {cast!r} (known: {sorted(_CASTS)})")
            dtype = _CASTS[cast]
        if info.is_ptr:
            raise TypeError(
                f"kernel {self.name}: Python scalar bound to the pointer {self._describe(p, i)}; "
                "pass a tensor (or declare a `constant T&` reference)"
            )
        kind, size = _DTYPE_KIND[dtype]
        if info.kind != 3 and not (kind == info.kind or {kind, info.kind} <= {0, 1} or
                                   ({kind, info.kind} <= {0, 1, 4} and size == 1)):
            raise TypeError(
                f"kernel {self.name}: Python {type(v).__name__} (bound as {dtype}) given for {self._describe(p, i)}: "
                "MPS would reinterpret its bytes; convert it or use arg_casts"
            )
        if info.size != size:
            raise TypeError(
                f"kernel {self.name}: Python {type(v).__name__} is bound as {size}-byte {dtype} but "
                f"{self._describe(p, i)} is {info.size} bytes; use arg_casts={{{i}: ...}} or a "
                f"{'`constant long&`' if dtype == torch.int64 else 'matching'} parameter"
            )
        return torch.tensor([v], dtype=dtype).numpy().tobytes()

    # ---- launch ----------------------------------------------------------------------
    def __call__(self, *args, threads=None, group_size=None, arg_casts=None):
        threads3 = _dims(threads, "threads", self.name)
        group3 = _dims(group_size, "group_size", self.name)
        if len(_as_list(threads)) != len(_as_list(group_size)):
            raise ValueError(f"kernel {self.name}: threads {threads} and group_size {group_size} differ in rank")
        total = group3[0] * group3[1] * group3[2]
        if total > self.max_threads_per_threadgroup:
            raise ValueError(
                f"kernel {self.name}: group_size {group_size} has {total} threads, more than the "
                f"{self.max_threads_per_threadgroup} a threadgroup can hold"
            )
        if len(args) != self._nbuf:
            raise ValueError(f"kernel {self.name} takes {self._nbuf} buffer arguments, got {len(args)}")
        casts = dict(arg_casts or {})
        for k in casts:
            if not isinstance(k, int) or not 0 <= k < len(args):
                raise ValueError(f"kernel {self.name}: arg_casts key {k!r} is not an argument index")

        rt = _runtime()
        ptrs = (ctypes.c_void_p * max(self._nbuf, 1))()
        regions: list[_Region] = []
        keep: list[Any] = []
        copy_back: list[tuple[int, int, int]] = []  # (host address, guarded address, size)
        labels: list[bytes] = []
        checked = self._lib.bounds_check

        def guarded(size: int, label: str) -> int:
            # Aligned to the largest power of two (<= 16) dividing size: ends exactly at the guard.
            align = min(16, size & -size) if size else 16
            m, ml = ctypes.c_void_p(), ctypes.c_uint64()
            addr = rt.msl_guarded_alloc(size, align, ctypes.byref(m), ctypes.byref(ml))
            if not addr:
                raise MemoryError("metal_sim: cannot map a guarded buffer")
            lb = label.encode()
            labels.append(lb)
            regions.append(_Region(m.value, ml.value, addr, size, lb))
            return addr

        try:
            storages: dict[int, list] = {}
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    if i in casts:
                        raise TypeError(f"kernel {self.name}: arg_casts applies to scalars, argument {i} is a tensor")
                    self._check_tensor(i, a)
                    nbytes = a.numel() * a.element_size()
                    if not checked:
                        ptrs[i] = a.data_ptr()
                        continue
                    key = a.untyped_storage().data_ptr()
                    lo, hi = a.data_ptr(), a.data_ptr() + nbytes
                    g = storages.setdefault(key, [lo, hi, []])
                    g[0], g[1] = min(g[0], lo), max(g[1], hi)
                    g[2].append((i, a))
                else:
                    data = self._scalar_bytes(i, a, casts.get(i))
                    buf = ctypes.create_string_buffer(data, len(data))
                    keep.append(buf)
                    if checked:
                        p, _ = self._param(i)
                        addr = guarded(len(data), f"kernel {self.name}: {self._describe(p, i)}")
                        ctypes.memmove(addr, buf, len(data))
                        ptrs[i] = addr
                    else:
                        ptrs[i] = ctypes.addressof(buf)
            for lo, hi, members in storages.values():
                names = ", ".join(self._describe(self._param(i)[0], i) for i, _ in members)
                addr = guarded(hi - lo, f"kernel {self.name}: {names}")
                if hi > lo:
                    ctypes.memmove(addr, lo, hi - lo)
                for i, a in members:
                    ptrs[i] = addr + (a.data_ptr() - lo)
                if any(not self._params[i][1].is_const for i, _ in members) and hi > lo:
                    copy_back.append((lo, addr, hi - lo))
            arr = (_Region * max(len(regions), 1))(*regions)
            err = ctypes.create_string_buffer(4096)
            with _dispatch_lock:
                rc = rt.msl_dispatch(self._entry.thunk, ptrs, (ctypes.c_uint32 * 3)(*threads3),
                                     (ctypes.c_uint32 * 3)(*group3), arr, len(regions), err, 4096,
                                     int(self._lib.timeout))
            if rc != 0:
                msg = err.value.decode(errors="replace")
                names = self._lib._tg_names
                msg = re.sub(r"threadgroup variable #(\d+)",
                             lambda m: f"threadgroup variable '{names[int(m.group(1))]}'" if int(m.group(1)) < len(names)
                             else m.group(0), msg)
                raise MetalSimError(f"kernel {self.name}: {msg}")
            for host, dev, size in copy_back:
                ctypes.memmove(host, dev, size)
        finally:
            for r in regions:
                rt.msl_guarded_free(r.map, r.maplen)


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, torch.Size)) else [v]


def _dims(v, what: str, name: str) -> list[int]:
    if v is None:
        raise ValueError(f"kernel {name}: pass {what}= explicitly (compile_shader's defaults differ by version)")
    try:
        dims = [operator.index(d) for d in _as_list(v)]
    except TypeError:
        dims = []
    if not 1 <= len(dims) <= 3 or any(isinstance(d, bool) for d in _as_list(v)):
        raise ValueError(f"kernel {name}: {what} must be an int or a list of 1-3 ints, got {v!r}")
    if any(d <= 0 for d in dims):
        raise ValueError(f"kernel {name}: {what} must be positive, got {v!r}")
    if any(d >= 2**32 for d in dims):
        raise ValueError(f"kernel {name}: {what} {v!r} is too large")
    return dims + [1] * (3 - len(dims))
