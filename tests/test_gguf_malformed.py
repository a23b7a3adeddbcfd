"""Malformed GGUF files: every one raises GGUFError naming the file and the problem, fast and in bounded memory.

Bad files are made two ways: gguf-py's GGUFWriter writes a valid file and gguf-py's GGUFReader tells
where each field sits, then bytes are patched; or `raw_gguf` writes the byte layout directly for
structures the writer cannot express (absurd counts, nesting, invalid type ids).
"""

import struct
import subprocess
import sys
import time
import tracemalloc

import gguf
import numpy as np
import pytest
import torch

from ferrum_mps.gguf_file import GGUFError, read_gguf

# ------------------------------------------------------------------ generators


def write_valid(path, tensors=None, kv=None):
    """A small valid file: three F32 tensors of 64 elements (256 bytes each) by default."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "tiny")
    for k, v in (kv or {}).items():
        w.add_key_value(k, v[0], v[1])
    for name, arr in (tensors or {n: np.full((2, 32), i, np.float32) for i, n in enumerate(("ta", "tb", "tc"))}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _u32(v):
    return struct.pack("<I", v)


def _u64(v):
    return struct.pack("<Q", v)


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return _u64(len(b)) + b


def raw_gguf(path, kv_bytes=b"", n_kv=0, n_tensors=0, tail=b"", version=3):
    path.write_bytes(b"GGUF" + _u32(version) + _u64(n_tensors) + _u64(n_kv) + kv_bytes + tail)
    return path


def kv(key, vtype, payload):
    return _str(key) + _u32(vtype) + payload


class Layout:
    """Where gguf-py's own reader finds each field of a file, for byte patching."""

    def __init__(self, path):
        self.path = path
        self.reader = gguf.GGUFReader(str(path))

    def tensor_part(self, name, part):  # parts: 0 name length, 1 name, 2 n_dims, 3 dims, 4 type, 5 offset
        f = next(t for t in self.reader.tensors if t.name == name).field
        return f.offset + sum(int(p.nbytes) for p in f.parts[:part])

    def field_part(self, key, part):  # parts: 0 key length, 1 key, 2 value type, 3.. value
        f = self.reader.fields[key]
        return f.offset + sum(int(p.nbytes) for p in f.parts[:part])

    def offset_of(self, name):
        return int(next(t for t in self.reader.tensors if t.name == name).field.parts[5][0])

    def patch(self, at, data):
        b = bytearray(self.path.read_bytes())
        b[at : at + len(data)] = data
        self.path.write_bytes(bytes(b))


@pytest.fixture
def valid(tmp_path):
    return Layout(write_valid(tmp_path / "m.gguf"))


def rejects(path, *needles):
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_the_valid_file_reads(valid):
    f = read_gguf(valid.path)
    assert list(f.tensors) == ["ta", "tb", "tc"]
    assert float(f.tensors["tc"].dequantize()[0, 0]) == 2.0


# ------------------------------------------------------------------ tensor layout


def test_overlapping_tensor_data(valid):
    valid.patch(valid.tensor_part("tb", 5), _u64(valid.offset_of("ta") + 64))  # aligned, inside ta
    rejects(valid.path, "'ta'", "overlaps", "'tb'")


def test_aliased_tensor_data(valid):
    valid.patch(valid.tensor_part("tc", 5), _u64(valid.offset_of("tb")))
    rejects(valid.path, "overlaps")


@pytest.mark.parametrize("back", [32, 2**20])
def test_offset_wrapping_past_2_64_into_the_header(valid, back):
    # In C, data_start + offset wraps to a spot `back` bytes before the data section: inside the header.
    valid.patch(valid.tensor_part("tb", 5), _u64(2**64 - back))
    rejects(valid.path, "'tb'", "wraps past 2**64")


def test_unaligned_offset(valid):
    valid.patch(valid.tensor_part("tb", 5), _u64(valid.offset_of("tb") + 4))
    rejects(valid.path, "'tb'", "not a multiple of the alignment 32")


def test_swapped_offsets_are_refused(valid):
    # Same sizes, so nothing overlaps: still the wrong weights under each name. llama.cpp refuses it too.
    a, b = valid.offset_of("ta"), valid.offset_of("tb")
    valid.patch(valid.tensor_part("ta", 5), _u64(b))
    valid.patch(valid.tensor_part("tb", 5), _u64(a))
    rejects(valid.path, "'ta'", "expected 0")


def test_retyped_tensor(valid):
    valid.patch(valid.tensor_part("ta", 4), _u32(int(gguf.GGMLQuantizationType.F16)))  # half the bytes
    rejects(valid.path, "'tb'", "expected")


def test_retyped_last_tensor_leaves_unexplained_bytes(valid):
    valid.patch(valid.tensor_part("tc", 4), _u32(int(gguf.GGMLQuantizationType.F16)))
    rejects(valid.path, "follow the last tensor")


def test_trailing_garbage(valid):
    valid.path.write_bytes(valid.path.read_bytes() + b"\0" * 64)
    rejects(valid.path, "follow the last tensor")


def test_duplicated_tensor_name(valid):
    valid.patch(valid.tensor_part("tb", 1), b"ta")
    rejects(valid.path, "duplicate tensor name 'ta'")


@pytest.mark.parametrize("n_dims,needle", [(0, "0 dimensions"), (5, "5 dimensions"), (2**32 - 1, "dimensions")])
def test_dimension_count(valid, n_dims, needle):
    valid.patch(valid.tensor_part("tb", 2), _u32(n_dims))
    rejects(valid.path, "'tb'", needle)


@pytest.mark.parametrize(
    "dims,needle",
    [((2**32, 2**32), "overflows int64"), ((32, 2**63), "negative"), ((32, 0), "size 0"), ((2**62, 4), "overflows"),
     ((32, 2**57), "offset + size overflows int64")],  # 2**62 elements fit int64, their 2**64 bytes do not
)
def test_bad_dimensions(valid, dims, needle):
    valid.patch(valid.tensor_part("tb", 3), b"".join(_u64(d) for d in dims))
    rejects(valid.path, "'tb'", needle)


def test_dimension_product_that_fits_int64_but_not_the_file(valid):
    valid.patch(valid.tensor_part("tc", 3), _u64(32) + _u64(2**40))
    rejects(valid.path, "'tc'", "past the end of the file")


def test_long_and_empty_tensor_names(tmp_path):
    p = write_valid(tmp_path / "long.gguf", tensors={"x" * 64: np.zeros(32, np.float32)})
    rejects(p, "at most 63")
    lay = Layout(write_valid(tmp_path / "empty.gguf", tensors={"e": np.zeros(32, np.float32)}))
    lay.patch(lay.tensor_part("e", 0), _u64(0))  # the name check comes before the (now misread) rest
    rejects(lay.path, "empty name")


def test_tensor_count_beyond_the_file(valid):
    valid.patch(16 - 8, _u64(2**40))  # header: magic, version, tensor count, kv count
    rejects(valid.path, "tensors", "can hold")


def test_unknown_type_id(valid):
    for tid in (4, 250, 2**31):  # 4 = the removed Q4_2
        write_valid(valid.path)
        valid.patch(valid.tensor_part("tb", 4), _u32(tid))
        rejects(valid.path, f"unknown GGML quantization type id {tid}")


# ------------------------------------------------------------------ metadata


def test_huge_key_count_fails_before_any_work(tmp_path):
    p = raw_gguf(tmp_path / "k.gguf", kv("a", 4, _u32(1)), n_kv=2**62)
    rejects(p, f"{2**62} metadata keys", "can hold")


@pytest.mark.parametrize("length", [2**63, 2**40, 100])
def test_huge_string_length(tmp_path, length):
    p = raw_gguf(tmp_path / "s.gguf", kv("general.name", 8, _u64(length) + b"tiny"), n_kv=1)
    rejects(p, "'general.name'", "past the end")


@pytest.mark.parametrize("itype,length", [(4, 2**62), (8, 2**61), (0, 10**12), (12, 2**60)])
def test_huge_array_length(tmp_path, itype, length):
    p = raw_gguf(tmp_path / "a.gguf", kv("tokenizer.ggml.tokens", 9, _u32(itype) + _u64(length) + b"\0" * 64), n_kv=1)
    rejects(p, "'tokenizer.ggml.tokens'", "past the end")


def test_huge_key_length(tmp_path):
    p = raw_gguf(tmp_path / "k.gguf", _u64(2**64 - 1) + b"abc" + b"\0" * 32, n_kv=1)
    rejects(p, "metadata key 0", "past the end")


def test_nested_arrays_are_refused_not_flattened(tmp_path):
    p = write_valid(tmp_path / "n.gguf", kv={"x.nested": ([[1, 2], [3]], gguf.GGUFValueType.ARRAY)})
    assert any(f.name == "x.nested" for f in gguf.GGUFReader(str(p)).fields.values())  # gguf-py wrote it
    rejects(p, "'x.nested'", "array of arrays")


def test_deep_nesting_no_recursion_error(tmp_path):
    deep = _u32(9) + _u64(1)
    p = raw_gguf(tmp_path / "d.gguf", kv("x", 9, deep * 100_000 + _u32(4) + _u64(0)), n_kv=1)
    rejects(p, "array of arrays")


def test_a_million_empty_nested_arrays_fail_at_once(tmp_path):
    p = raw_gguf(tmp_path / "m.gguf", kv("x", 9, _u32(9) + _u64(10**6) + (_u32(0) + _u64(0)) * 10**6), n_kv=1)
    t0 = time.perf_counter()
    rejects(p, "array of arrays")
    assert time.perf_counter() - t0 < 5  # it was 102 s: a generous bound, this is a hang guard not a benchmark


def test_duplicated_key(tmp_path):
    lay = Layout(write_valid(tmp_path / "d.gguf", kv={"x.k1": (1, gguf.GGUFValueType.UINT32), "x.k2": (2, gguf.GGUFValueType.UINT32)}))
    lay.patch(lay.field_part("x.k2", 1), b"x.k1")
    rejects(lay.path, "duplicate key 'x.k1'")


def test_empty_key(tmp_path):
    p = raw_gguf(tmp_path / "e.gguf", kv("", 4, _u32(1)), n_kv=1)
    rejects(p, "key 0 is empty")


@pytest.mark.parametrize("vtype", [13, 77, 2**32 - 1])
def test_value_type_out_of_range(valid, vtype):
    valid.patch(valid.field_part("general.name", 2), _u32(vtype))
    rejects(valid.path, "'general.name'", f"invalid value type {vtype}")


@pytest.mark.parametrize("itype", [13, 2**31])
def test_array_element_type_out_of_range(tmp_path, itype):
    p = raw_gguf(tmp_path / "a.gguf", kv("x", 9, _u32(itype) + _u64(1) + _u32(0)), n_kv=1)
    rejects(p, "'x'", f"invalid element type {itype}")


def test_bool_bytes_other_than_0_1(tmp_path):
    rejects(raw_gguf(tmp_path / "b.gguf", kv("x.flag", 7, b"\x02"), n_kv=1), "'x.flag'", "bool")
    rejects(raw_gguf(tmp_path / "c.gguf", kv("x.flags", 9, _u32(7) + _u64(3) + b"\x00\x01\x05"), n_kv=1), "'x.flags'", "bool")


@pytest.mark.parametrize(
    "value,vtype,needle",
    [(0, gguf.GGUFValueType.UINT32, "power of 2"), (48, gguf.GGUFValueType.UINT32, "power of 2"),
     (32, gguf.GGUFValueType.UINT64, "must be a UINT32")],
)
def test_bad_alignment(tmp_path, value, vtype, needle):
    p = tmp_path / "al.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_key_value("general.alignment", value, vtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    rejects(p, "general.alignment", needle)


@pytest.mark.parametrize("version,needle", [(0, "version 0"), (1, "version 1"), (4, "version 4"), (3 << 24, "byte order")])
def test_versions(valid, version, needle):
    valid.patch(4, _u32(version))
    rejects(valid.path, needle)


def test_every_truncation_is_a_gguf_error(tmp_path):
    full = write_valid(tmp_path / "f.gguf", kv={"tokenizer.ggml.tokens": (["a", "bb", ""], gguf.GGUFValueType.ARRAY)}).read_bytes()
    data_start = Layout(tmp_path / "f.gguf").reader.data_offset
    cut = tmp_path / "cut.gguf"
    for n in [*range(data_start + 1), *range(data_start + 1, len(full), 13)]:  # every header byte, then some data
        cut.write_bytes(full[:n])
        with pytest.raises(GGUFError, match=str(cut)):
            read_gguf(cut, mmap=False)


def test_random_byte_flips_give_gguf_error_or_a_file(tmp_path):
    full = bytearray(write_valid(tmp_path / "f.gguf", kv={"x.arr": ([1.5, 2.5], gguf.GGUFValueType.ARRAY)}).read_bytes())
    data_start = Layout(tmp_path / "f.gguf").reader.data_offset
    rng = np.random.default_rng(0)
    bad = tmp_path / "flip.gguf"
    outcomes = {"error": 0, "ok": 0}
    for _ in range(300):
        b = bytearray(full)
        for at in rng.integers(0, data_start, size=int(rng.integers(1, 4))):
            b[at] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            read_gguf(bad, mmap=False)  # not cached: every round parses
            outcomes["ok"] += 1
        except GGUFError as e:
            assert str(bad) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 100, outcomes


def test_parse_memory_is_proportional_to_the_file(tmp_path):
    n = 20_000
    p = raw_gguf(tmp_path / "keys.gguf", b"".join(kv(f"k.{i:07d}", 4, _u32(i)) for i in range(n)), n_kv=n)
    tracemalloc.start()
    f = read_gguf(p, mmap=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(f.metadata) == n and f.metadata["k.0019999"] == 19999
    # gguf-py's reader needed ~130x the file (1.5 GB for 10 MB); a dict of short keys and ints needs <20x.
    assert peak < 20 * p.stat().st_size, (peak, p.stat().st_size)


# ------------------------------------------------------------------ the file changing under a mapping


def test_mmap_false_is_a_private_copy(valid):
    f = read_gguf(valid.path, mmap=False)
    assert not f.mapped and read_gguf(valid.path).mapped
    before = f.tensors["tc"].raw.clone()
    valid.path.write_bytes(b"")  # truncated in place: a mapping would now SIGBUS on access
    assert torch.equal(f.tensors["tc"].raw, before)


def test_truncating_a_mapped_file_kills_with_sigbus(valid):
    """Documented behaviour of mmap=True (read_gguf's docstring): the process dies with SIGBUS."""
    code = (
        "import os, sys, torch; from ferrum_mps.gguf_file import read_gguf\n"
        "p = sys.argv[1]; f = read_gguf(p); os.truncate(p, 0)\n"
        "print(float(f.tensors['tc'].raw.float().sum()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(valid.path)], capture_output=True, timeout=120)
    assert r.returncode == -7, (r.returncode, r.stderr[-500:])  # -SIGBUS


# ------------------------------------------------------------------ the gguf-py hooks the checks live in


def test_the_overridden_gguf_py_hooks_exist_with_the_same_signatures():
    """Every check above lives in an override of a private GGUFReader hook: if a gguf release renamed or
    re-signed one, the override would silently stop being called and the checks with it."""
    import inspect

    from ferrum_mps.gguf_file import _Reader

    hooks = [n for n, v in vars(_Reader).items() if callable(v) and n.startswith("_") and not n.startswith("__")
             and hasattr(gguf.GGUFReader, n)]
    assert {"_get", "_get_field_parts", "_build_fields", "_get_tensor_info_field", "_build_tensors"} <= set(hooks)
    for name in hooks:
        ours, theirs = inspect.signature(getattr(_Reader, name)), inspect.signature(getattr(gguf.GGUFReader, name))
        assert list(ours.parameters) == list(theirs.parameters), (name, ours, theirs)
    for helper in ("_get_str", "_push_field", "gguf_scalar_to_np", "_build_tensor_info"):  # called, not overridden
        assert hasattr(gguf.GGUFReader, helper), helper


def test_results_are_gguf_py_s_on_a_valid_file():
    """The reader really is gguf-py's: its fields and tensors are what GGUFReader built on the checked file."""
    import tempfile
    from pathlib import Path

    from ferrum_mps.gguf_file import _Reader

    with tempfile.TemporaryDirectory() as d:
        p = write_valid(Path(d) / "v.gguf", kv={"general.alignment": (64, gguf.GGUFValueType.UINT32)})
        r, ref = _Reader(p), gguf.GGUFReader(str(p))
        assert isinstance(r, gguf.GGUFReader) and r.alignment == ref.alignment == 64
        assert r.data_offset == ref.data_offset
        assert [(t.name, t.data_offset, t.n_bytes) for t in r.tensors] == [(t.name, t.data_offset, t.n_bytes) for t in ref.tensors]
        assert r.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}


def test_tensor_name_not_utf8(valid):
    valid.patch(valid.tensor_part("tb", 1), b"\xff")
    rejects(valid.path, "tensor 1", "not valid UTF-8")
