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
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from .translate import MetalTranslationError, translate

HERE = Path(__file__).resolve().parent
_HARNESS_FILES = ("metal_sim.h", "msl_rt.h", "translate.py", "compiler.py")
_lock = threading.Lock()


class CompilerNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = Path(root) / "ferrum_mps" / "metal_sim"
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
    out = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=120)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else " ".join(argv)


def _target_flags() -> list[str]:
    # A baseline CPU so cached libraries stay valid on every machine of the same arch.
    if toolchain()["zig"]:
        return ["-mcpu=baseline"]
    return ["-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else ["-march=armv8-a"]


def _common_flags() -> list[str]:
    return ["-std=c++17", "-fsigned-char", "-fno-exceptions", "-fno-rtti", "-fno-omit-frame-pointer", "-w"]


def _build_flags() -> list[str]:
    flags = _common_flags() + _target_flags() + ["-O2", "-fPIC", "-shared", "-Xclang", "-ffloat16-excess-precision=none"]
    if toolchain()["zig"]:
        flags.append("-nostdlib++")
    if platform.system() == "Darwin":
        flags += ["-undefined", "dynamic_lookup"]
    return flags


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
                flags = [f for f in _build_flags() if f not in ("-Xclang", "-ffloat16-excess-precision=none")]
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
    return _run(toolchain()["front"] + ["-E", "-P", "-x", "c++", "-std=c++17"] + _DEFINES + ["-"],
                "preprocessing the Metal source", stdin=src)


def build(source: str) -> tuple[Path, dict]:
    """Translate and compile `source`; returns (shared library, metadata). Cached by hash."""
    key = hashlib.sha256(source.encode() + _harness_hash().encode()).hexdigest()[:24]
    d = cache_dir()
    so, meta_path = d / f"lib-{key}.so", d / f"lib-{key}.json"
    if so.exists() and meta_path.exists():
        return so, json.loads(meta_path.read_text())
    pre = preprocess(source)
    try:
        cpp, entries = translate(pre)
    except MetalTranslationError:
        raise
    text = '#include "metal_sim.h"\n' + cpp
    cpp_path = d / f"lib-{key}.cpp"
    cpp_path.write_text(text)
    tmp = so.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tc = toolchain()
    _run(tc["build"] + _build_flags() + ["-I", str(HERE), "-x", "c++", str(cpp_path), "-o", str(tmp)],
         f"compiling the Metal source (translated C++ kept at {cpp_path})")
    meta = {
        "entries": [
            {
                "host": e.host,
                "kernel": e.kernel.name,
                "params": [{"name": p.name, "type": p.type, "buffer": p.buffer, "builtin": p.builtin} for p in e.kernel.params],
            }
            for e in entries
        ]
    }
    mtmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
    mtmp.write_text(json.dumps(meta))
    os.replace(tmp, so)
    os.replace(mtmp, meta_path)
    return so, meta
