"""GGUF files as raw uint8 torch tensors.

`read_gguf(path)` maps the file once (or, with mmap=False, reads it into private memory) and
parses it with gguf-py's GGUFReader, whose hooks are bounded by the file size here (see _Reader);
every `QTensor.raw` is a zero-copy view of those bytes (the views keep them alive). Nothing is
dequantized on load. A malformed file raises GGUFError naming the file and the problem: everything
llama.cpp's gguf reader (ggml/src/gguf.cpp) refuses, plus bool bytes other than 0/1, empty or
>63-byte tensor names, zero-sized dimensions, overlapping tensor data and bytes after the last tensor.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGMLQuantizationType
from gguf.gguf_reader import ReaderField

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
# gguf-py's GGUFReader parses the file (the developers' guide: read GGUF with it, never re-implement
# the parser). Stock, it trusts every count in the file: it slices past the end and fails later with
# an IndexError, recurses into nested arrays (RecursionError at depth 500), keeps several numpy views
# per value (400k keys in a 10 MB file: 47 s and 1.5 GB) and checks no tensor layout (a tensor offset
# that wraps past 2**64 is read from inside the header). _Reader overrides the private hooks where
# gguf-py meets a count from the file, so that each is checked against the bytes left before any work
# or allocation, and checks the tensor infos and data offset GGUFReader computed before it builds
# tensors on them. Parsing then costs time and memory proportional to the file.
#
# The overridden hooks (_get, _get_field_parts, _build_fields, _get_tensor_info_field,
# _build_tensors) and the helpers called (_get_str, _push_field, gguf_scalar_to_np) have the same
# names, signatures and contracts in gguf 0.17.0, 0.17.1, 0.18.0 and 0.19.0 (read from the released
# wheels). What differs: 0.17 warns and keeps a duplicated key under a new name (0.18 raises KeyError)
# and does not check that general.alignment is a power of 2; both are checked here first.

_VT = GGUFValueType
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses tensor names of 64 bytes or more
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, key count
_VT_OF = {int(t): t for t in _VT}  # GGUFValueType(i) costs ~1 us, once per key
_DTYPES = {t: np.dtype(t) for t in (np.uint8, np.uint32, np.uint64, *GGUFReader.gguf_scalar_to_np.values())}


def _type_name(t: int) -> str:
    try:
        return _VT(t).name
    except ValueError:
        return str(t)


def _text(part: np.ndarray) -> str:
    return str(part.tobytes(), "utf-8", "replace")


def _field_value(f: ReaderField) -> Any:
    """A metadata ReaderField (as _Reader builds it) as a plain Python value: str, number, bool or list."""
    if f.types[0] == _VT.ARRAY:
        if f.types[-1] == _VT.STRING:
            return [_text(f.parts[i]) for i in f.data]
        return f.parts[f.data[0]].tolist()  # _Reader keeps a scalar array as one view
    if f.types[0] == _VT.STRING:
        return _text(f.parts[-1])
    return f.parts[-1].tolist()[0]


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    offset: int  # relative to the start of the data section
    nbytes: int


class _Reader(GGUFReader):
    """GGUFReader with every read bounded by the file and the structural checks of llama.cpp and more.

    `private`: parse these bytes (a private copy of the file) instead of the mapping GGUFReader makes.
    Metadata values end up in `self.metadata` as plain Python values.
    """

    _buf: np.ndarray | None = None

    def __init__(self, path: Path, private: np.ndarray | None = None):
        self._path = path
        self._buf = private  # else set from GGUFReader's own mapping on the first read
        self._where: tuple[str, Any] = ("{}", "the header")  # what is being read, for error messages
        self.metadata: dict[str, Any] = {}
        self._infos: list[_TensorInfo] = []
        self._names: set[str] = set()
        super().__init__(path, "c")  # copy-on-write: torch needs writable arrays; a stray write must not crash

    def _fail(self, msg: str):
        raise GGUFError(f"{self._path}: {msg}")

    def _context(self) -> str:
        fmt, arg = self._where
        return fmt.format(arg)

    # -- reads

    def _get(self, offset, dtype, count=1, override_order=None):
        # Stock: slices silently past the end of the file and fails later (IndexError, short arrays).
        buf = self._buf
        if buf is None:  # the first read: GGUFReader.__init__ has just mapped the file
            buf = self._buf = self.data.view(np.ndarray)  # slicing np.memmap itself costs microseconds per slice
        dt = _DTYPES.get(dtype) or np.dtype(dtype)
        offset, count = int(offset), int(count)
        if dt.itemsize * count > len(buf) - offset:
            self._fail(
                f"{self._context()}: {dt.itemsize * count} bytes at offset {offset} run past the end of the file "
                f"({len(buf)} bytes): truncated or corrupt"
            )
        arr = np.frombuffer(buf, dt, count, offset)  # one view of buf: half the cost of stock's slice + view
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(dt.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        # Stock: recurses once per array element (nested arrays: RecursionError, and silently flattened)
        # and makes several views per element. Here a scalar array is one view of the file and a string
        # array one view per string (`data` indexes them; the length parts are not kept).
        raw_type = int(raw_type)
        nptype = self.gguf_scalar_to_np.get(raw_type)
        if nptype is not None:
            val = self._get(orig_offs, nptype)
            if raw_type == _VT.BOOL and val.view(np.uint8)[0] > 1:
                self._fail(f"corrupt metadata: {self._context()} is a bool stored as byte {val.view(np.uint8)[0]} (GGUF allows only 0 and 1)")
            return int(val.nbytes), [val], [0], [_VT_OF[raw_type]]
        if raw_type == _VT.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        if raw_type != _VT.ARRAY:
            self._fail(f"corrupt metadata: {self._context()} has invalid value type {raw_type} (valid: 0-12)")
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = int(raw_itype[0]), int(alen[0]), orig_offs + 12
        if itype == _VT.ARRAY:
            self._fail(f"corrupt metadata: {self._context()} is an array of arrays, which GGUF does not allow")
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, n)  # checks n against the bytes left before numpy sees it
            if itype == _VT.BOOL and n and int(values.view(np.uint8).max()) > 1:
                self._fail(f"corrupt metadata: {self._context()} holds bool bytes other than 0 and 1")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [_VT.ARRAY, _VT_OF[itype]]
        if itype != _VT.STRING:
            self._fail(f"corrupt metadata: {self._context()} is an array of invalid element type {itype} (valid: 0-8, 10-12)")
        buf = self._buf
        mv, end = memoryview(buf), len(buf)
        if 8 * n > end - offs:  # each string costs at least its 8-byte length: bound the loop before running it
            self._fail(f"{self._context()}: an array of {n} strings at offset {offs} runs past the end of the file ({end} bytes)")
        parts: list = [raw_itype, alen]
        for i in range(n):
            slen = int.from_bytes(mv[offs : offs + 8], "little") if offs + 8 <= end else end
            if slen > end - offs - 8:
                self._fail(f"{self._context()}: string {i} at offset {offs} runs past the end of the file ({end} bytes)")
            parts.append(buf[offs + 8 : offs + 8 + slen])
            offs += 8 + slen
        return offs - orig_offs, parts, list(range(2, n + 2)), [_VT.ARRAY, _VT.STRING]

    # -- the key/value loop

    def _build_fields(self, offs, count):
        # Stock: the same loop keeping a ReaderField per key, ~1 KB of numpy views and lists (42x the
        # bytes of a small u32 key, measured), for as many keys as the header claims. Here each value
        # becomes a plain Python value as it is read, the counts are checked against the bytes left
        # first, and only what GGUFReader reads back itself (general.alignment) stays a ReaderField.
        # Cost: ~12 us per key through GGUFReader's views (400k u32 keys: ~5 s, 64 MB; stock gguf-py
        # 50 s, 1.2 GB; a struct-based parser of our own took 0.9 s, but the guide says never re-implement it).
        if self.byte_order != "I":
            self._fail("byte order differs from this machine's; byte-swapped GGUF files are not supported")
        n_kv, n_tensors = int(count), int(self.fields["GGUF.tensor_count"].parts[0][0])
        left = len(self._buf) - offs
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            self._fail(
                f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the {left} bytes after "
                "the header can hold: truncated or corrupt"
            )
        metadata = self.metadata
        for i in range(n_kv):
            orig_offs = offs
            self._where = ("metadata key {}", i)
            klen, kdata = self._get_str(offs)
            key = _text(kdata)
            if not key:
                self._fail(f"corrupt metadata: key {i} is empty")
            if key in metadata:
                self._fail(f"corrupt metadata: duplicate key {key!r} (key {i})")
            offs += 8 + int(kdata.nbytes)
            self._where = ("value type of {!r}", key)
            raw_type = self._get(offs, np.uint32)
            offs += 4
            self._where = ("value of {!r}", key)
            size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            field = ReaderField(orig_offs, key, [klen, kdata, raw_type, *parts], [j + 3 for j in idxs], types)
            metadata[key] = _field_value(field)
            if key == "general.alignment":
                self._push_field(field, skip_sum=True)
            offs += size
        align = self.fields.get("general.alignment")
        if align is not None:  # GGUFReader reads it after the tensor infos; gguf 0.17 does not check it
            if align.types != [_VT.UINT32]:
                self._fail(f"general.alignment must be a UINT32, got {_type_name(align.types[0])}")
            a = int(align.parts[-1][0])
            if a <= 0 or a & (a - 1):
                self._fail(f"general.alignment {a} is not a power of 2")
        return offs

    # -- tensor infos and layout

    def _get_tensor_info_field(self, orig_offs):
        # The name and dimension count are checked before GGUFReader reads n_dims dims; the rest after.
        i = len(self._infos)
        self._where = ("name of tensor {}", i)
        _, name_data = self._get_str(orig_offs)
        try:  # GGUFReader decodes tensor names strictly
            name = str(name_data.tobytes(), "utf-8")
        except UnicodeDecodeError:
            self._fail(f"tensor {i}: its name {_text(name_data)!r} is not valid UTF-8")
        what = f"tensor {i} ({name!r})"
        if not name:
            self._fail(f"tensor {i} has an empty name")
        if name_data.nbytes >= _MAX_NAME:
            self._fail(f"{what}: name is {name_data.nbytes} bytes long, GGUF/ggml allow at most {_MAX_NAME - 1}")
        if name in self._names:
            self._fail(f"duplicate tensor name {name!r} (tensor {i})")
        self._where = ("{}", what)
        n_dims = int(self._get(orig_offs + 8 + name_data.nbytes, np.uint32)[0])
        if not 1 <= n_dims <= _MAX_DIMS:
            self._fail(f"{what} has {n_dims} dimensions; GGUF tensors have 1 to {_MAX_DIMS}")
        field = super()._get_tensor_info_field(orig_offs)
        _, _, _, dims_arr, raw_dtype, offset = field.parts
        dims = [int(d) for d in dims_arr]
        if any(d >= 2**63 for d in dims):
            self._fail(f"{what} has a negative dimension (as int64): {dims}")
        if any(d == 0 for d in dims):
            self._fail(f"{what} has a dimension of size 0: {dims}")
        numel = prod(dims)
        if numel >= 2**63:
            self._fail(f"{what}: the product of its dimensions {dims} overflows int64")
        type_id = int(raw_dtype[0])
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            self._fail(f"{what}: unknown GGML quantization type id {type_id} (gguf {_gguf_version()} does not know it)")
        if dims[0] % block:
            self._fail(f"{what}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
        self._names.add(name)
        self._infos.append(_TensorInfo(name, int(offset[0]), numel // block * type_size))
        return field

    def _build_tensors(self, start_offs, fields):
        # Stock: adds each offset to the data section start in uint64 (wrapping past 2**64 back into
        # the header) and accepts overlapping, aliased or unaligned data. Checked on GGUFReader's data
        # offset and the tensor infos before it makes any view.
        _check_layout(self, self._infos, int(start_offs), int(self.alignment))
        super()._build_tensors(start_offs, fields)


def _check_layout(r: _Reader, infos: list[_TensorInfo], data_start: int, alignment: int) -> None:
    """Tensor data must lie in the file, aligned, disjoint and back to back in info order (as llama.cpp requires)."""
    size = len(r._buf)
    if infos and data_start > size:
        r._fail(f"the data section would start at {data_start}, past the end of the file ({size} bytes): truncated")
    if not infos and size > data_start:
        r._fail(f"{size - data_start} bytes follow the metadata of a file without tensors")
    for t in infos:
        span = f"tensor {t.name!r} data [{t.offset}, {t.offset + t.nbytes}) (relative to the data section at {data_start})"
        if t.offset % alignment:
            r._fail(f"{span}: offset is not a multiple of the alignment {alignment}")
        if t.offset >= 2**63:  # a negative int64: data_start + offset wraps past 2**64, back into the header
            r._fail(f"{span}: offset + size wraps past 2**64 (the offset is negative as int64)")
        if t.offset + t.nbytes >= 2**63:
            r._fail(f"{span}: offset + size overflows int64")
        if data_start + t.offset + t.nbytes > size:
            r._fail(f"{span} runs past the end of the file ({size} bytes): truncated or corrupt")
    by_offset = sorted(infos, key=lambda t: (t.offset, t.nbytes))
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            r._fail(
                f"tensor {a.name!r} data [{a.offset}, {a.offset + a.nbytes}) overlaps tensor {b.name!r} data "
                f"[{b.offset}, {b.offset + b.nbytes})"
            )
    expected = 0
    for t in infos:
        if t.offset != expected:
            r._fail(
                f"tensor {t.name!r} has data offset {t.offset}, expected {expected}: GGUF stores tensor data back "
                f"to back in tensor-info order, padded to the alignment {alignment} (llama.cpp refuses this file too)"
            )
        expected += -(-t.nbytes // alignment) * alignment
    end = data_start + (infos[-1].offset + infos[-1].nbytes if infos else 0)
    if infos and size > end + (-end % alignment):
        r._fail(f"{size - end} bytes follow the last tensor's data (ending at {end}); more than its alignment padding")


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _check_header(path: Path) -> int:
    """The file size, after checking the magic and that a header fits (GGUFReader's own message is 'GGUF magic invalid')."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if size < _HEADER_BYTES:
        raise GGUFError(f"{path}: truncated GGUF file ({size} bytes, shorter than the header)")
    return size


def _private_copy(path: Path, size: int) -> torch.Tensor:
    """The whole file read into private memory (mmap=False)."""
    try:
        data = torch.empty(size, dtype=torch.uint8)
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError
        raise MemoryError(f"{path}: cannot allocate {size} bytes for a private copy (mmap=False): {e}") from e
    with open(path, "rb") as fh:
        got = fh.readinto(memoryview(data.numpy()))
    if got != size:
        raise GGUFError(f"{path}: file shrank from {size} to {got} bytes while reading it")
    return data


def _open_reader(path: Path, private: np.ndarray | None) -> _Reader:
    try:
        return _Reader(path, private)
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:  # not expected: the hooks check first
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


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
    size = _check_header(path)
    private = None if mmap else _private_copy(path, size).numpy()
    # With mmap=False GGUFReader still maps the file, but every read goes to the private copy.
    reader = _open_reader(path, private)
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        raw = torch.from_numpy(t.data.reshape(-1).view(np.uint8))  # GGUFReader types F32/F16/I* views
        try:
            tensors[t.name] = QTensor(raw, t.tensor_type, shape)
        except ValueError as e:  # the hooks checked everything QTensor does; keep its message if not
            raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from e
    metadata = reader.metadata
    arch = metadata.get("general.architecture")
    return GGUFFile(
        path=path,
        architecture=arch if isinstance(arch, str) else None,
        metadata=metadata,
        tensors=tensors,
        version=int(reader.fields["GGUF.version"].parts[0][0]),
        alignment=int(reader.alignment),
        file_size=len(reader._buf),
        tensor_offsets={t.name: int(t.data_offset) for t in reader.tensors},
        mapped=mmap,
    )
