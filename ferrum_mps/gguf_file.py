"""GGUF files as raw uint8 torch tensors, on gguf-py's memory-mapped GGUFReader.

`read_gguf(path)` maps the file once; every `QTensor.raw` is a zero-copy view of
that mapping (the views keep it alive). Nothing is dequantized on load.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGMLQuantizationType

from .quants import dequantize_raw

log = logging.getLogger(__name__)

__all__ = ["GGUFError", "GGUFFile", "QTensor", "read_gguf"]

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a readable GGUF file (bad magic, truncated, corrupt or unsupported contents)."""


def _qtype(q) -> GGMLQuantizationType:
    try:
        return q if isinstance(q, GGMLQuantizationType) else GGMLQuantizationType(int(q))
    except (TypeError, ValueError):
        raise ValueError(f"unknown GGML quantization type {q!r}") from None


@dataclass(frozen=True, repr=False)
class QTensor:
    """A tensor of GGML blocks: `raw` uint8 [*shape[:-1], row_nbytes], `qtype`, torch-order logical `shape`."""

    raw: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    def __post_init__(self):
        qtype = _qtype(self.qtype)
        shape = tuple(int(s) for s in self.shape)
        raw = self.raw
        if not isinstance(raw, torch.Tensor):
            raise TypeError(f"raw must be a torch.uint8 tensor, got {type(raw).__name__}")
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw must be torch.uint8, got {raw.dtype}")
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        block, size = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block}")
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        if raw.numel() != prod(byte_shape):
            raise ValueError(
                f"raw has {raw.numel()} bytes but a {qtype.name} tensor of shape {shape} needs {prod(byte_shape)}"
            )
        if not raw.is_contiguous():
            raise ValueError("raw must be contiguous")
        object.__setattr__(self, "raw", raw.view(byte_shape))
        object.__setattr__(self, "qtype", qtype)
        object.__setattr__(self, "shape", shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def to(self, device) -> "QTensor":
        """The same blocks on `device` (copies the raw bytes only)."""
        return QTensor(self.raw.to(device), self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_raw(self.raw, self.qtype, self.shape[-1], dtype).view(self.shape)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, shape={self.shape}, nbytes={self.nbytes}, device={self.device})"


@dataclass(repr=False)
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors as QTensors in file order."""

    path: Path
    architecture: str | None
    metadata: dict[str, Any]
    tensors: dict[str, QTensor]
    version: int = 3
    alignment: int = 32
    file_size: int = 0
    tensor_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def hparams(self) -> dict[str, Any]:
        """The `{architecture}.*` metadata with the prefix stripped (e.g. "block_count", "attention.head_count")."""
        prefix = f"{self.architecture}."
        return {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r}, "
            f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)"
        )


def _field_value(f) -> Any:
    """A ReaderField as a plain Python value (strings decoded as UTF-8, arrays as lists)."""
    def text(part) -> str:
        return bytes(part).decode("utf-8", errors="replace")

    if not f.types:
        return None
    if f.types[0] == GGUFValueType.ARRAY:
        if len(f.types) == 1:  # empty array: no element type was recorded
            return []
        if f.types[-1] == GGUFValueType.STRING:
            return [text(f.parts[i]) for i in f.data]
        if len(f.types) == 2 and f.data:
            # Scalars sit in consecutive parts; one concatenate instead of a .tolist() per element.
            return np.concatenate([f.parts[i] for i in f.data]).tolist()
        return f.contents()
    if f.types[0] == GGUFValueType.STRING:
        return text(f.parts[-1])
    return f.parts[-1].tolist()[0]


def _check_magic(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if size < 24:
        raise GGUFError(f"{path}: truncated GGUF file ({size} bytes, shorter than the header)")
    return size


class _Reader(GGUFReader):
    """gguf-py's reader, with metadata arrays walked in one pass.

    The stock reader makes several numpy views per array element, which takes
    tens of seconds for a 262k-token vocabulary. Scalar arrays become one view of
    the mapping (`data` = [2], all values in that part); string arrays one view per
    string. Everything else (and byte-swapped files) goes through gguf-py unchanged.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        # The stock reader silently returns short arrays past the end of the file and then fails obscurely.
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise ValueError(
                f"reading {end - int(offset)} bytes at offset {offset} runs past the end of the file ({len(self.data)} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) != 1 or len(alen) != 1:
            raise ValueError(f"metadata array header at offset {orig_offs} runs past the end of the file")
        itype, n = GGUFValueType(raw_itype[0]), int(alen[0])
        offs = orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, n)
            if len(values) != n:
                raise ValueError(f"metadata array at offset {orig_offs} runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        buf = self.data.view(np.ndarray)  # slicing np.memmap itself costs microseconds per slice
        mv, end = memoryview(buf), len(buf)
        parts: list = [raw_itype, alen]
        for _ in range(n):
            if offs + 8 > end:
                raise ValueError(f"metadata string array at offset {orig_offs} runs past the end of the file")
            slen = int.from_bytes(mv[offs : offs + 8], "little")
            if offs + 8 + slen > end:
                raise ValueError(f"metadata string array at offset {orig_offs} runs past the end of the file")
            parts.append(buf[offs + 8 : offs + 8 + slen])
            offs += 8 + slen
        return offs - orig_offs, parts, list(range(2, n + 2)), [GGUFValueType.ARRAY, itype]


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _open_reader(path: Path) -> GGUFReader:
    try:
        # Copy-on-write: torch needs writable arrays, and a stray in-place op must not crash on a read-only page.
        return _Reader(path, "c")
    except ValueError as e:
        msg = str(e)
        if "GGMLQuantizationType" in msg:
            qid = re.search(r"(\d+)\)? is not a valid", msg)
            raise GGUFError(
                f"{path}: unknown GGML quantization type id {qid.group(1) if qid else msg} "
                f"(gguf {_gguf_version()} does not know it)"
            ) from e
        if "block size" in msg or "row size" in msg:
            raise GGUFError(f"{path}: tensor row length does not fit its quantization type ({msg})") from e
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({msg})") from e
    except (IndexError, KeyError, OverflowError, TypeError, MemoryError) as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def _to_qtensor(path: Path, t, file_size: int) -> QTensor:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    qtype = GGMLQuantizationType(t.tensor_type)
    end = int(t.data_offset) + int(t.n_bytes)
    if end > file_size or t.data.nbytes != t.n_bytes:
        raise GGUFError(
            f"{path}: tensor {t.name!r} data [{t.data_offset}, {end}) runs past the end of the file ({file_size} bytes)"
        )
    data = t.data.reshape(-1).view(np.uint8)
    try:
        return QTensor(torch.from_numpy(data), qtype, shape)
    except ValueError as e:
        raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from e


_cache_lock = threading.Lock()
_cache: OrderedDict[tuple, GGUFFile] = OrderedDict()
_CACHE_SIZE = 4


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Map a GGUF file: metadata as plain Python values, tensors as zero-copy uint8 QTensors.

    gguf-py's reader walks every array element of the metadata in Python (a big
    vocabulary takes many seconds), so parsed files are kept in a small cache keyed
    by path, size and mtime; callers share the returned object and must not mutate it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    gf = _read(path)
    with _cache_lock:
        _cache[key] = gf
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return gf


def _read(path: Path) -> GGUFFile:
    file_size = _check_magic(path)
    log.info("reading GGUF %s", path)
    reader = _open_reader(path)
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: byte order differs from this machine's; byte-swapped GGUF files are not supported")
    try:
        metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, IndexError) as e:
        raise GGUFError(f"{path}: corrupt metadata ({e})") from e
    tensors = {t.name: _to_qtensor(path, t, file_size) for t in reader.tensors}
    arch = metadata.get("general.architecture")
    return GGUFFile(
        path=path,
        architecture=arch if isinstance(arch, str) else None,
        metadata=metadata,
        tensors=tensors,
        version=int(reader.fields["GGUF.version"].parts[0][0]),
        alignment=int(reader.alignment),
        file_size=file_size,
        tensor_offsets={t.name: int(t.data_offset) for t in reader.tensors},
    )
