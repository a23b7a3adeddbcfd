"""Finding a clang, building the runtime and kernel libraries, caching them by hash."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import threading
from functools import lru_cache
from pathlib import Path

from ferrum_mps.default_model import cache_dir as ferrum_cache_dir

from .translate import Entry, KernelDef, Param, entry_code, translate

HERE = Path(__file__).resolve().parent
_HARNESS_FILES = ("metal_sim.h", "msl_rt.h", "translate.py", "compiler.py")
_lock = threading.Lock()


class CompilerNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    d = ferrum_cache_dir() / "metal_sim"
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=None)
def toolchain() -> dict:
    """{'build': argv for building shared libraries, 'front': argv for -E / -fsyntax-only, 'id': ...}.

    FERRUM_METAL_SIM_CXX overrides (a clang++ >= 16 command line); else the `ziglang`
    package's clang; else a system clang++ >= 16.
    """
    env = os.environ.get("FERRUM_METAL_SIM_CXX")
    if env:
        argv = shlex.split(env)
        if len(argv) == 2 and Path(argv[0]).name.startswith("zig") and argv[1] in ("c++", "cc"):
            return {"build": argv, "front": [argv[0], "clang"], "id": _version(argv), "zig": True}
        return {"build": argv, "front": argv, "id": _version(argv), "zig": False}
    try:
        import ziglang

        zig = str(Path(ziglang.__file__).parent / "zig")
        if os.path.exists(zig):
            return {"build": [zig, "c++"], "front": [zig, "clang"], "id": _version([zig, "c++"]), "zig": True}
    except ImportError:
        pass
    for name in ["clang++"] + [f"clang++-{v}" for v in range(30, 15, -1)]:
        exe = shutil.which(name)
        if not exe:
            continue
        ver = _version([exe])
        m = re.search(r"clang version (\d+)", ver)
        if m and int(m.group(1)) >= 16:
            return {"build": [exe], "front": [exe], "id": ver, "zig": False}
    raise CompilerNotFound(
        "metal_sim needs clang >= 16: `pip install ziglang` (the test extra of ferrum-mps), "
        "install clang, or set FERRUM_METAL_SIM_CXX to a clang++ command"
    )


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise CompilerNotFound(f"metal_sim: cannot run the C++ compiler {argv} (FERRUM_METAL_SIM_CXX?): {e}") from None
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else " ".join(argv)


@lru_cache(maxsize=None)
def _x86_v3() -> bool:
    """x86-64-v3 (AVX2, FMA, F16C): without FMA every fma() is a slow libm call."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags


def _target_flags() -> list[str]:
    # A fixed CPU level (not -march=native) so cached libraries are portable; the level is
    # part of the cache key.
    x86 = platform.machine() in ("x86_64", "AMD64")
    if toolchain()["zig"]:
        return ["-mcpu=x86_64_v3" if x86 and _x86_v3() else "-mcpu=baseline"]
    if x86:
        return ["-march=x86-64-v3" if _x86_v3() else "-march=x86-64"]
    return ["-march=armv8-a"]


def _common_flags() -> list[str]:
    return ["-std=c++17", "-fsigned-char", "-fno-exceptions", "-fno-rtti", "-w"]


def _clang_major() -> int:
    m = re.search(r"clang version (\d+)", toolchain()["id"])
    return int(m.group(1)) if m else 0


def _rounding_flags() -> list[str]:
    # half/bfloat round after every operation, as on the GPU (not once per expression).
    flags = ["-Xclang", "-ffloat16-excess-precision=none"]
    if _clang_major() >= 17:
        flags += ["-Xclang", "-fbfloat16-excess-precision=none"]
    return flags


def _build_flags() -> list[str]:
    # -fno-finite-loops: an endless loop must stay endless (and hit the watchdog), not vanish.
    flags = _common_flags() + _target_flags() + ["-O2", "-fPIC", "-shared", "-fno-finite-loops"] + _rounding_flags()
    if toolchain()["zig"]:
        flags.append("-nostdlib++")
    if platform.system() == "Darwin":
        flags += ["-undefined", "dynamic_lookup"]
    return flags


def _write_atomic(path: Path, text: str) -> None:
    """Write via a private temporary file: parallel test processes share the cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run(argv: list[str], what: str, stdin: str | None = None) -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SyntaxError(f"metal_sim: {what} failed:\n{r.stderr.strip()}")
    return r.stdout


def _harness_hash() -> str:
    h = hashlib.sha256()
    for f in _HARNESS_FILES:
        h.update((HERE / f).read_bytes())
    h.update(toolchain()["id"].encode())
    h.update(" ".join(_build_flags()).encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def runtime_library() -> Path:
    """The fiber runtime shared library, built once per harness version and machine."""
    src = (HERE / "runtime.cpp").read_bytes() + (HERE / "msl_rt.h").read_bytes()
    key = hashlib.sha256(src + _harness_hash().encode()).hexdigest()[:20]
    out = cache_dir() / f"runtime-{key}.so"
    if not out.exists():
        with _lock:
            if not out.exists():
                tc = toolchain()
                flags = [f for f in _build_flags() if f not in _rounding_flags()]
                flags += ["-x", "c++", "-fno-stack-protector", "-U_FORTIFY_SOURCE"]
                tmp = out.with_suffix(f".{os.getpid()}.tmp")
                _run(tc["build"] + flags + ["-I", str(HERE), str(HERE / "runtime.cpp"), "-o", str(tmp)],
                     "building the metal_sim runtime")
                os.replace(tmp, out)
    return out


_INCLUDE_RE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<(metal_\w+|simd/\w+\.h)>.*$", re.M)
_DEFINES = ["-D__METAL_VERSION__=310", "-D__METAL__=1", "-D__METAL_MACOS__=1", "-D__HAVE_SIMDGROUP_MATRIX__=1"]


def preprocess(source: str) -> str:
    src = _INCLUDE_RE.sub("", source)
    bf = ["-D__HAVE_BFLOAT__=1"] if _clang_major() >= 17 else []
    return _run(toolchain()["front"] + ["-E", "-P", "-x", "c++", "-std=c++17"] + _DEFINES + bf + ["-"],
                "preprocessing the Metal source", stdin=src)


def _entry_from_meta(m: dict) -> Entry:
    kd = KernelDef(m["kernel"], [Param(**p) for p in m["params"]], m.get("max_threads"))
    return Entry(host=m["host"], expr=m["expr"], kernel=kd, index=m["index"])


# clang rejects copying a struct out of (or calling a method on) an address space;
# Metal allows both: those diagnostics are not errors of the kernel.
_FALSE_POSITIVE = re.compile(
    r"implicit (copy|move) (constructor|assignment operator)|'this' argument to member function|"
    r"'this' object is in address space|"
    r"candidate function \(the implicit (copy|move) assignment operator\)"
)


def check_address_spaces(check_text: str, key: str) -> None:
    """Type-check the kernels with device/threadgroup/constant as clang address spaces.

    Catches what the Metal compiler rejects and a plain C++ build cannot see: a device
    pointer passed where a threadgroup pointer is expected, a write through constant.
    """
    path = cache_dir() / f"lib-{key}-check.cpp"
    _write_atomic(path, '#include "metal_sim.h"\n' + check_text)
    r = subprocess.run(
        toolchain()["front"] + ["-fsyntax-only", "-ferror-limit=0", "-D__MSL_CHECK_AS", "-I", str(HERE), "-x", "c++"]
        + _common_flags() + [str(path)],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode == 0:
        return
    # Group each error with its notes; keep errors located in the kernel source.
    diags: list[list[str]] = []
    for line in r.stderr.splitlines():
        if re.search(r":\d+:\d+: (error|fatal error):", line):
            diags.append([line])
        elif diags:
            diags[-1].append(line)
    real = [d for d in diags if d[0].startswith(str(path)) and not any(_FALSE_POSITIVE.search(x) for x in d)]
    if real:
        msg = "\n".join("\n".join(d[:6]) for d in real[:20])
        raise SyntaxError(f"metal_sim: the Metal source does not type-check (translated C++ at {path}):\n{msg}")


def translate_source(source: str, check: bool = True) -> tuple[str, dict]:
    """Preprocess, translate and type-check `source` (cached by hash): returns (key, metadata)."""
    key = hashlib.sha256(source.encode() + _harness_hash().encode()).hexdigest()[:24]
    d = cache_dir()
    meta_path = d / f"lib-{key}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("checked") or not check:
            return key, meta
    build_text, check_text, entries, tg_names = translate(preprocess(source))
    if check:
        check_address_spaces(check_text, key)
    _write_atomic(d / f"lib-{key}.cpp", '#include "metal_sim.h"\n' + build_text)
    meta = {
        "checked": check,
        "tg_names": tg_names,
        "entries": [
            {
                "host": e.host,
                "expr": e.expr,
                "index": e.index,
                "kernel": e.kernel.name,
                "max_threads": e.kernel.max_threads,
                "params": [{"name": p.name, "type": p.type, "buffer": p.buffer, "builtin": p.builtin} for p in e.kernel.params],
            }
            for e in entries
        ]
    }
    _write_atomic(meta_path, json.dumps(meta))
    return key, meta


def build_kernel(key: str, meta_entry: dict) -> Path:
    """Compile one kernel of a translated library into its own shared library (cached)."""
    d = cache_dir()
    so = d / f"lib-{key}-{meta_entry['index']}.so"
    if so.exists():
        return so
    base = (d / f"lib-{key}.cpp").read_text()
    e = _entry_from_meta(meta_entry)
    cpp = d / f"lib-{key}-{e.index}.cpp"
    _write_atomic(cpp, base + "\n" + entry_code([e]))
    tmp = so.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    _run(toolchain()["build"] + _build_flags() + ["-I", str(HERE), "-x", "c++", str(cpp), "-o", str(tmp)],
         f"compiling kernel {e.host!r} (translated C++ kept at {cpp})")
    os.replace(tmp, so)
    return so
