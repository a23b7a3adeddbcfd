"""`load_model` / `load_tokenizer`: a GGUF file to a transformers-compatible model and its tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype when load_model is given none: float32 on CPU, bfloat16 on MPS.

    Not float16: the residual stream of the default model (Gemma-3-270M) reaches 1.04e5 in
    float32 (layer 14; past float16's 65504 from layer 7), so in float16 it overflows to inf and
    no logit is right; bfloat16 has float32's range and agrees on 98.1% of top-1 tokens over 320
    (benchmarks/bench_numerics.py). MPS has bfloat16 from macOS 14; before it, float32.
    """
    if device.type != "mps":
        return torch.float32
    return torch.bfloat16 if torch.backends.mps.is_macos_or_newer(14, 0) else torch.float32


def resolve_device(device=None) -> torch.device:
    """torch.device, ValueError when it does not exist on this machine."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available on this machine (no Apple GPU / torch built without MPS)")
    if device.type not in ("cpu", "mps"):
        try:
            torch.empty(0, device=device)
        except Exception as e:  # noqa: BLE001 - torch raises several types for absent backends
            raise ValueError(f"device {str(device)!r} is not available: {e}") from None
    return device


def _to_device(qt, device: torch.device):
    """The QTensor's raw bytes on `device` (a no-copy view of the mmap on CPU)."""
    if device.type == "mps" and hasattr(torch.mps, "_host_alias_storage"):
        # Unified memory: read the file bytes straight into the MPS buffer, no staging copy.
        # Callers synchronize once before and after the whole loop.
        out = torch.empty(qt.raw.shape, dtype=torch.uint8, device=device)
        try:
            alias = torch.mps._host_alias_storage(out.untyped_storage())
        except RuntimeError:  # not a shared-storage MTLBuffer: let torch copy
            return qt.to(device)
        host = torch.empty(0, dtype=torch.uint8).set_(alias)
        host[: out.numel()].view(out.shape).copy_(qt.raw)
        return type(qt)(out, qt.qtype, qt.shape)
    return qt.to(device)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024
        except Exception:  # noqa: BLE001
            return None


def load_model(path, device=None, dtype=None, progress: bool = True, mmap: bool = True):
    """A GGUF file as a ready-to-use `GGUFForCausalLM` (transformers PreTrainedModel + GenerationMixin).

    device: default mps when available else cpu. dtype of activations: default `default_dtype(device)`
    (bfloat16 on mps, float32 on cpu). Quantized weights stay raw bytes on the device (never dequantized at load).
    mmap: on CPU the weights are views of a mapping of the file, so truncating or rewriting the
    file in place while the model lives kills the process with SIGBUS (replacing it by a rename is
    safe). mmap=False copies the weights into private memory (the file's size in RAM) instead.
    On MPS the weights are copied to the device either way.
    """
    from ferrum_mps.gguf_file import GGUFError, read_gguf
    from ferrum_mps.models import model_class
    from ferrum_mps.models.tensors import check_tensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    device = resolve_device(device)
    if dtype is None:
        dtype = default_dtype(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    t0 = time.perf_counter()
    f = read_gguf(path, mmap=mmap)
    try:
        cls = model_class(f.architecture)
        config = cls.config_from_gguf(f.metadata, f.tensors)
        check_tensors(config, f.tensors, source=str(path))
    except GGUFError:
        raise
    except ValueError as e:  # the config code's checks (models/config.py): name the file once
        raise GGUFError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e
    if device.type == "mps":
        torch.mps.synchronize()
    tensors = {
        name: _to_device(qt, device)
        for name, qt in tqdm(f.tensors.items(), desc=f"loading {path.name}", unit="tensor", disable=not progress)
    }
    if device.type == "mps":
        torch.mps.synchronize()
    # Inference only: the ferrum ops have no backward, so no parameter may ask autograd for one
    # (a float router left trainable made torch.compile trace a backward outside no_grad).
    model = cls(config, tensors, dtype=dtype).to(device).eval().requires_grad_(False)
    model.load_seconds = time.perf_counter() - t0
    model.gguf_path = path
    rss = _resident_bytes()
    log.info(
        "loaded %s (%s, %d tensors, %.1f MB) in %.2f s on %s; resident %s MB",
        path.name, f.architecture, len(tensors), path.stat().st_size / 2**20, model.load_seconds, device,
        "?" if rss is None else f"{rss / 2**20:.0f}",
    )
    return model


def load_tokenizer(path, cache: bool = True):
    """transformers' tokenizer built from the GGUF metadata (chat template kept).

    The file is first read and checked by our own reader (structure, then the `tokenizer.*` keys:
    array lengths and types, token ids, merges, chat template), so a malformed file raises one
    GGUFError naming the file and the problem instead of an IndexError/struct.error from deep inside
    transformers; any failure while transformers builds the tokenizer is reported the same way.

    Building it means rebuilding BPE merges or a SentencePiece model from the vocabulary
    (tens of seconds for a 262k vocabulary), so the result is saved once as tokenizer.json
    (no pickle) under the user cache dir, keyed by the file's path, size and mtime.
    """
    from transformers import AutoTokenizer

    from .gguf_file import GGUFError, read_gguf
    from .gguf_tokenizer import check_tokenizer_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    cached = _tokenizer_cache_dir(path) if cache else None
    if cached is not None and (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            log.warning("ignoring unreadable cached tokenizer %s (%s: %s)", cached, type(e).__name__, e)
            shutil.rmtree(cached, ignore_errors=True)
    check_tokenizer_metadata(read_gguf(path).metadata, str(path))
    try:
        # transformers parses the file a second time with its own reader: its tokenizer converters
        # are internal and moved between 5.x releases (integrations/ggml.py -> integrations/gguf/).
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise anything from KeyError to Rust panics
        raise GGUFError(f"{path}: cannot build its tokenizer: {type(e).__name__}: {e}") from e
    if cached is not None:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(cached)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _tokenizer_cache_dir(path: Path) -> Path:
    from .default_model import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = cache_dir() / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    return root / key
