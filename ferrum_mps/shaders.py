"""Where the MPS implementations get their Metal libraries from.

Every MPS launch goes through `kernel(file, name)`. The compiler behind it is
`torch.mps.compile_shader` unless a test swaps in another one with the same
calling convention (the Metal-on-CPU harness, `ferrum_mps.testing.metal_sim`):
then the very same launch code runs on CPU tensors.
"""

from __future__ import annotations

import contextlib
import threading
from importlib import resources
from typing import Any, Callable, Iterator

ShaderCompiler = Callable[[str], Any]

# Sources are concatenated because compile_shader cannot resolve our own #includes:
# every library is these headers (those that exist) followed by its own .metal file.
_HEADERS = ("quant_blocks.h", "qmatmul.h")

_lock = threading.Lock()
_compiler: ShaderCompiler | None = None
_libraries: dict[str, Any] = {}
_kernels: dict[tuple[str, str], Any] = {}
# Launch plans of the op modules (kernel handles + grids, keyed by what they were validated
# for): they hold kernels of the current compiler, so they are dropped with them.
plans: dict[Any, Any] = {}


def _default_compiler(source: str) -> Any:
    import torch

    if not torch.backends.mps.is_available():
        raise RuntimeError(
            "no Metal device: MPS kernels need an Apple GPU "
            "(for CPU testing use ferrum_mps.metal.use_shader_compiler(...))"
        )
    return torch.mps.compile_shader(source)


def get_shader_compiler() -> ShaderCompiler:
    return _compiler or _default_compiler


def set_shader_compiler(fn: ShaderCompiler | None) -> None:
    """Compile Metal sources with `fn(source) -> library` from now on (None: torch.mps.compile_shader).

    `fn` must follow torch.mps.compile_shader's calling convention. Cached
    libraries and kernels are dropped so nothing compiled by the previous
    compiler is launched by the next one.
    """
    global _compiler
    with _lock:
        _compiler = fn
        _libraries.clear()
        _kernels.clear()
        plans.clear()


@contextlib.contextmanager
def use_shader_compiler(fn: ShaderCompiler) -> Iterator[None]:
    """Temporarily compile (and so launch) every ferrum kernel with `fn`."""
    previous = _compiler
    set_shader_compiler(fn)
    try:
        yield
    finally:
        set_shader_compiler(previous)


def metal_source(file: str) -> str:
    """The generated prelude (ferrum_mps.kernels: launch geometry, type lists), the shared headers, then `file`."""
    from .kernels import prelude

    root = resources.files("ferrum_mps.metal_ops")
    names = [h for h in _HEADERS if root.joinpath(h).is_file() and h != file] + [file]
    return "\n".join([prelude()] + [root.joinpath(n).read_text(encoding="ascii") for n in names])


def library(file: str) -> Any:
    with _lock:
        lib = _libraries.get(file)
        if lib is None:
            lib = get_shader_compiler()(metal_source(file))
            _libraries[file] = lib
        return lib


def kernel(file: str, name: str) -> Any:
    """The kernel `name` of metal_ops/`file`, looked up once (compile_shader builds a new wrapper per lookup)."""
    key = (file, name)
    k = _kernels.get(key)
    if k is None:
        k = getattr(library(file), name)
        _kernels[key] = k
    return k
