"""GGUF files as raw uint8 torch tensors.

`read_gguf(path)` maps the file once (or, with mmap=False, reads it into private memory) and
parses it with a bounds-checked reader of its own; every `QTensor.raw` is a zero-copy view of
those bytes (the views keep them alive). Nothing is dequantized on load. A malformed file raises
GGUFError naming the file and the problem: everything llama.cpp's gguf reader (ggml/src/gguf.cpp)
refuses, plus bool bytes other than 0/1, empty or >63-byte tensor names, zero-sized dimensions,
overlapping tensor data and bytes after the last tensor.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGMLQuantizationType

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
    mapped: bool = True  # tensors are views of a mapping of the file (see read_gguf), else a private copy

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


# ---------------------------------------------------------------- the parser
#
# Our own bounds-checked reader, not gguf-py's GGUFReader: that one builds several numpy views
# per metadata value (400k keys in a 10 MB file took 47 s and 1.5 GB; 1M empty nested arrays
# 102 s and 2.4 GB), recurses into nested arrays (RecursionError at depth 500) and checks no
# tensor layout. Every count read from the file is checked against the bytes left before any
# work or allocation happens, so parsing cost and memory stay proportional to the file size:
# metadata values become Python objects of at most ~8 bytes per file byte (a list of float32
# scores: 8 bytes of pointer + a shared or 24-byte float per 4 bytes read).

_VT = GGUFValueType
# value type -> (struct format, numpy dtype); STRING and ARRAY are handled apart.
_SCALARS: dict[int, tuple[str, str]] = {
    _VT.UINT8: ("<B", "<u1"), _VT.INT8: ("<b", "<i1"), _VT.UINT16: ("<H", "<u2"), _VT.INT16: ("<h", "<i2"),
    _VT.UINT32: ("<I", "<u4"), _VT.INT32: ("<i", "<i4"), _VT.FLOAT32: ("<f", "<f4"), _VT.BOOL: ("<B", "<u1"),
    _VT.UINT64: ("<Q", "<u8"), _VT.INT64: ("<q", "<i8"), _VT.FLOAT64: ("<d", "<f8"),
}
_SIZES = {t: struct.calcsize(fmt) for t, (fmt, _) in _SCALARS.items()}
_FAST = {t: (struct.Struct(fmt).unpack_from, _SIZES[t]) for t, (fmt, _) in _SCALARS.items() if t != _VT.BOOL}
_U32, _U64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
_SUPPORTED_VERSIONS = (2, 3)  # llama.cpp: v1 is no longer supported, nothing above 3 exists
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses tensor names of 64 bytes or more
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_DEFAULT_ALIGNMENT = 32


def _type_name(t: int) -> str:
    try:
        return _VT(t).name
    except ValueError:
        return str(t)


class _Parser:
    """A cursor over the file bytes; every read checks the bytes left and raises GGUFError naming the file."""

    def __init__(self, path: Path, buf: np.ndarray):
        self.path, self.buf, self.mv = path, buf, memoryview(buf)
        self.size, self.pos = len(buf), 0

    def fail(self, msg: str):
        raise GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(
                f"{what} at offset {self.pos} needs {n} bytes but only {self.size - self.pos} remain: "
                f"truncated or corrupt (runs past the end of the file, {self.size} bytes)"
            )

    def scalar(self, vtype: int, what: str):
        fmt, _ = _SCALARS[vtype]
        n = _SIZES[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += n
        if vtype == _VT.BOOL:
            if v > 1:
                self.fail(f"corrupt metadata: {what} is a bool stored as byte {v} (GGUF allows only 0 and 1)")
            return bool(v)
        return v

    def u32(self, what: str) -> int:
        return self.scalar(_VT.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_VT.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        s = str(self.mv[self.pos : self.pos + n], "utf-8", "replace")
        self.pos += n
        return s

    def value(self, key: str, vtype: int):
        if vtype == _VT.STRING:
            return self.string(f"value of {key!r}")
        if vtype == _VT.ARRAY:
            return self.array(key)
        if vtype not in _SCALARS:
            self.fail(f"corrupt metadata: key {key!r} has invalid value type {vtype} (valid: 0-12)")
        return self.scalar(vtype, f"value of {key!r}")

    def array(self, key: str) -> list:
        itype = self.u32(f"element type of array {key!r}")
        n = self.u64(f"length of array {key!r}")
        if itype == _VT.ARRAY:
            self.fail(f"corrupt metadata: key {key!r} is an array of arrays, which GGUF does not allow")
        if itype == _VT.STRING:
            # Each string costs at least its 8-byte length: bound the loop before running it.
            self.need(8 * n, f"array {key!r} of {n} strings")
            mv, buf, pos, end = self.mv, self.buf, self.pos, self.size
            out = []
            append = out.append
            for i in range(n):
                if pos + 8 > end:
                    self.pos = pos
                    self.need(8, f"length of string {i} of array {key!r}")
                slen = int.from_bytes(mv[pos : pos + 8], "little")
                pos += 8
                if slen > end - pos:
                    self.pos = pos
                    self.need(slen, f"string {i} of array {key!r}")
                append(str(mv[pos : pos + slen], "utf-8", "replace"))
                pos += slen
            self.pos = pos
            return out
        if itype not in _SCALARS:
            self.fail(f"corrupt metadata: array {key!r} has invalid element type {itype} (valid: 0-8, 10-12)")
        self.need(_SIZES[itype] * n, f"array {key!r} of {n} {_type_name(itype)}")
        values = np.frombuffer(self.buf, dtype=_SCALARS[itype][1], count=n, offset=self.pos)
        self.pos += values.nbytes
        if itype == _VT.BOOL:
            if n and int(values.max()) > 1:
                self.fail(f"corrupt metadata: array {key!r} holds bool bytes other than 0 and 1")
            return (values != 0).tolist()
        return values.tolist()


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dims innermost first)
    qtype: GGMLQuantizationType
    offset: int  # relative to the start of the data section
    nbytes: int


def _tensor_info(p: _Parser, i: int, seen: set) -> _TensorInfo:
    name = p.string(f"name of tensor {i}")
    what = f"tensor {i} ({name!r})"
    if not name:
        p.fail(f"tensor {i} has an empty name")
    if len(name.encode()) >= _MAX_NAME:
        p.fail(f"{what}: name is {len(name.encode())} bytes long, GGUF/ggml allow at most {_MAX_NAME - 1}")
    if name in seen:
        p.fail(f"duplicate tensor name {name!r} (tensor {i})")
    seen.add(name)
    n_dims = p.u32(f"dimension count of {what}")
    if not 1 <= n_dims <= _MAX_DIMS:
        p.fail(f"{what} has {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}")
    dims = [p.u64(f"dimension {d} of {what}") for d in range(n_dims)]
    if any(d >= 2**63 for d in dims):
        p.fail(f"{what} has a negative dimension (as int64): {dims}")
    if any(d == 0 for d in dims):
        p.fail(f"{what} has a dimension of size 0: {dims}")
    numel = prod(dims)
    if numel >= 2**63:
        p.fail(f"{what}: the product of its dimensions {dims} overflows int64")
    type_id = p.u32(f"type of {what}")
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        p.fail(f"{what}: unknown GGML quantization type id {type_id} (gguf {_gguf_version()} does not know it)")
    if dims[0] % block:
        p.fail(f"{what}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
    offset = p.u64(f"data offset of {what}")
    return _TensorInfo(name, tuple(reversed(dims)), qtype, offset, numel // block * type_size)


def _check_layout(p: _Parser, infos: list[_TensorInfo], data_start: int, alignment: int) -> None:
    """Tensor data must lie in the file, aligned, disjoint and back to back in info order (as llama.cpp requires)."""
    size = p.size
    for t in infos:
        span = f"tensor {t.name!r} data [{t.offset}, {t.offset + t.nbytes}) (relative to the data section at {data_start})"
        if t.offset % alignment:
            p.fail(f"{span}: offset is not a multiple of the alignment {alignment}")
        if t.offset >= 2**63:  # a negative int64: data_start + offset wraps past 2**64, back into the header
            p.fail(f"{span}: offset + size wraps past 2**64 (the offset is negative as int64)")
        if t.offset + t.nbytes >= 2**63:
            p.fail(f"{span}: offset + size overflows int64")
        if data_start + t.offset + t.nbytes > size:
            p.fail(f"{span} runs past the end of the file ({size} bytes): truncated or corrupt")
    by_offset = sorted(infos, key=lambda t: (t.offset, t.nbytes))
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            p.fail(
                f"tensor {a.name!r} data [{a.offset}, {a.offset + a.nbytes}) overlaps tensor {b.name!r} data "
                f"[{b.offset}, {b.offset + b.nbytes})"
            )
    expected = 0
    for t in infos:
        if t.offset != expected:
            p.fail(
                f"tensor {t.name!r} has data offset {t.offset}, expected {expected}: GGUF stores tensor data back "
                f"to back in tensor-info order, padded to the alignment {alignment} (llama.cpp refuses this file too)"
            )
        expected += -(-t.nbytes // alignment) * alignment
    end = data_start + (infos[-1].offset + infos[-1].nbytes if infos else 0)
    if size > end + (-end % alignment) and infos:
        p.fail(f"{size - end} bytes follow the last tensor's data (ending at {end}); more than its alignment padding")


def _parse(path: Path, buf: np.ndarray):
    """(version, metadata, alignment, data_start, tensor infos) of the GGUF bytes `buf`."""
    p = _Parser(path, buf)
    p.need(4, "magic")
    magic = bytes(p.mv[:4])
    if magic != GGUF_MAGIC:
        p.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    p.pos = 4
    if p.size < 24:
        p.fail(f"truncated GGUF file ({p.size} bytes, shorter than the header)")
    version = p.u32("version")
    if version & 0xFFFF == 0 and version:
        p.fail(f"version field {version:#x}: byte order differs from this machine's; byte-swapped GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        p.fail(f"GGUF version {version} is not supported (only {_SUPPORTED_VERSIONS})")
    n_tensors = p.u64("tensor count")
    n_kv = p.u64("metadata key count")
    left = p.size - p.pos
    if n_kv > left // _MIN_KV_BYTES or n_tensors > left // _MIN_TENSOR_INFO_BYTES or (
        n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left
    ):
        p.fail(
            f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the {left} bytes after the "
            "header can hold: truncated or corrupt"
        )
    metadata: dict[str, Any] = {}
    alignment = _DEFAULT_ALIGNMENT
    mv, size = p.mv, p.size
    for i in range(n_kv):
        # Inlined reads (no per-key message formatting): 400k keys parse in ~1 s instead of ~4 s.
        pos = p.pos
        if pos + 8 > size:
            p.need(8, f"length of metadata key {i}")
        (klen,) = _U64(mv, pos)
        pos += 8
        if klen > size - pos:
            p.pos = pos
            p.need(klen, f"metadata key {i}")
        key = str(mv[pos : pos + klen], "utf-8", "replace")
        pos += klen
        if not key:
            p.fail(f"corrupt metadata: key {i} is empty")
        if key in metadata:
            p.fail(f"corrupt metadata: duplicate key {key!r} (key {i})")
        if pos + 4 > size:
            p.pos = pos
            p.need(4, f"value type of {key!r}")
        (vtype,) = _U32(mv, pos)
        pos += 4
        fast = _FAST.get(vtype)
        if fast is not None and pos + fast[1] <= size:
            (metadata[key],) = fast[0](mv, pos)
            p.pos = pos + fast[1]
        else:
            p.pos = pos
            metadata[key] = p.value(key, vtype)
        if key == "general.alignment":
            alignment = metadata[key]
            if vtype != _VT.UINT32:
                p.fail(f"general.alignment must be a UINT32, got {_type_name(vtype)}")
            if alignment <= 0 or alignment & (alignment - 1):
                p.fail(f"general.alignment {alignment} is not a power of 2")
    seen: set[str] = set()
    infos = [_tensor_info(p, i, seen) for i in range(n_tensors)]
    data_start = p.pos + (-p.pos % alignment)
    if infos and data_start > p.size:
        p.fail(f"the data section would start at {data_start}, past the end of the file ({p.size} bytes): truncated")
    if not infos and p.size > data_start:
        p.fail(f"{p.size - p.pos} bytes follow the metadata of a file without tensors")
    _check_layout(p, infos, data_start, alignment)
    return version, metadata, alignment, data_start, infos


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _load_bytes(path: Path, mmap: bool):
    """(numpy uint8 view, torch uint8 tensor) of the whole file: a copy-on-write mapping or a private copy."""
    size = path.stat().st_size
    if size < 4:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if mmap:
        # Copy-on-write: torch needs writable arrays, and a stray in-place op must not crash on a read-only page.
        arr = np.memmap(path, mode="c").view(np.ndarray)  # slicing np.memmap itself costs microseconds per slice
        return arr, torch.from_numpy(arr)
    try:
        data = torch.empty(size, dtype=torch.uint8)
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError
        raise MemoryError(f"{path}: cannot allocate {size} bytes for a private copy (mmap=False): {e}") from e
    arr = data.numpy()
    with open(path, "rb") as fh:
        got = fh.readinto(memoryview(arr))
    if got != size:
        raise GGUFError(f"{path}: file shrank from {size} to {got} bytes while reading it")
    return arr, data


_cache_lock = threading.Lock()
_cache: OrderedDict[tuple, GGUFFile] = OrderedDict()
_CACHE_SIZE = 4


def read_gguf(path: str | os.PathLike, mmap: bool = True) -> GGUFFile:
    """Parse a GGUF file: metadata as plain Python values, tensors as uint8 QTensors.

    mmap=True (default): the tensors are zero-copy views of a copy-on-write mapping of the file.
    Loading is instant and costs no memory up front, but the file must stay as it is while any
    tensor is alive: truncating or rewriting it in place afterwards makes the next access to a
    vanished page kill the process with SIGBUS (a private mapping does not protect against that;
    replacing the file by a rename is safe). mmap=False reads the file once into private memory
    (costs its size in RAM), after which the file may change freely.

    Malformed files raise GGUFError naming the file and the problem. Parsing costs time and memory
    proportional to the file. Mapped files are kept in a small cache keyed by path, size and mtime;
    callers share the returned object and must not mutate it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if mmap:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    gf = _read(path, mmap)
    if mmap:  # a private copy is not cached: it would pin the file's size in RAM
        with _cache_lock:
            _cache[key] = gf
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return gf


def _read(path: Path, mmap: bool) -> GGUFFile:
    log.info("reading GGUF %s", path)
    arr, data = _load_bytes(path, mmap)
    version, metadata, alignment, data_start, infos = _parse(path, arr)
    tensors = {}
    for t in infos:
        start = data_start + t.offset
        try:
            tensors[t.name] = QTensor(data[start : start + t.nbytes], t.qtype, t.shape)
        except ValueError as e:  # the parser checked everything QTensor does; keep its message if not
            raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from e
    arch = metadata.get("general.architecture")
    return GGUFFile(
        path=path,
        architecture=arch if isinstance(arch, str) else None,
        metadata=metadata,
        tensors=tensors,
        version=version,
        alignment=alignment,
        file_size=len(arr),
        tensor_offsets={t.name: data_start + t.offset for t in infos},
        mapped=mmap,
    )
