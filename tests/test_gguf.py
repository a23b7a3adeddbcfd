"""read_gguf against gguf-py's own reader and writer, on hand-made files, broken files and the real Gemma file."""

import gc

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ferrum_mps import gguf_file
from ferrum_mps.gguf_file import GGUFError, QTensor, read_gguf

TOKENS = [f"tok{i}" for i in range(1500)] + ["▁héllo", "日本語", "", "<0x0A>"]


def random_blocks(rng, qtype, n_blocks):
    """Random bytes for `n_blocks` blocks of `qtype` whose fp16 scale fields are finite."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in {Q.Q4_K: (0, 2), Q.Q8_0: (0,), Q.Q6_K: (208,)}[qtype]:
        raw[:, off + 1] &= 0x3B  # exponent < 31: finite, and modest in size
    return raw


def write_small(path, rng):
    """A small GGUF made by gguf-py's writer; returns {name: (qtype, torch-order shape, bytes)}."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("llama.use_parallel_residual", True)
    w.add_string("general.name", "tiny ünïcode")
    w.add_int32("llama.signed", -7)
    w.add_uint64("llama.big", 2**40 + 3)
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.scores", [float(i) / 4 for i in range(len(TOKENS))])
    w.add_array("tokenizer.ggml.token_type", [i % 6 for i in range(len(TOKENS))])
    expect = {}
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    w.add_tensor("f32", f32)
    expect["f32"] = (Q.F32, (3, 8), f32.tobytes())
    f16 = rng.standard_normal((2, 32)).astype(np.float16)
    w.add_tensor("f16", f16)
    expect["f16"] = (Q.F16, (2, 32), f16.tobytes())
    for name, qtype, shape in [("q4k", Q.Q4_K, (3, 512)), ("q8", Q.Q8_0, (2, 4, 64)), ("q6k", Q.Q6_K, (5, 256))]:
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) // block
        raw = random_blocks(rng, qtype, n).reshape(*shape[:-1], shape[-1] // block * size)
        w.add_tensor(name, raw, raw_dtype=qtype)
        expect[name] = (qtype, shape, raw.tobytes())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.gguf"
    return path, write_small(path, np.random.default_rng(0))


def test_small_file_tensors(small):
    path, expect = small
    f = read_gguf(path)
    assert f.architecture == "llama" and f.path == path
    assert list(f.tensors) == list(expect)
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, (qtype, shape, data) in expect.items():
        qt = f.tensors[name]
        assert qt.qtype is qtype and qt.shape == shape
        assert qt.raw.dtype == torch.uint8 and qt.raw.is_contiguous()
        block, size = GGML_QUANT_SIZES[qtype]
        assert tuple(qt.raw.shape) == (*shape[:-1], shape[-1] // block * size)
        assert qt.raw.numpy().tobytes() == data and qt.nbytes == len(data)
        want = gguf.quants.dequantize(ref[name].data, qtype).reshape(shape)
        assert np.array_equal(qt.dequantize().numpy(), want)
        assert qt.dequantize(torch.float16).dtype == torch.float16
        assert qt.dequantize(torch.float16).shape == shape


def test_small_file_metadata_matches_gguf_reader(small):
    path, _ = small
    f = read_gguf(path)
    ref = gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(f.metadata) == keys
    for k in keys:
        want = ref.fields[k].contents()
        assert f.metadata[k] == want and type(f.metadata[k]) is type(want), k
    assert f.metadata["tokenizer.ggml.tokens"] == TOKENS
    assert f.metadata["general.name"] == "tiny ünïcode"
    assert f.metadata["llama.use_parallel_residual"] is True
    assert f.metadata["llama.big"] == 2**40 + 3 and f.metadata["llama.signed"] == -7
    assert f.hparams == {"block_count": 2, "rope.freq_base": 10000.0, "use_parallel_residual": True,
                         "signed": -7, "big": 2**40 + 3}


def test_raw_is_a_zero_copy_view_that_keeps_the_mapping_alive(small):
    path, expect = small
    f = read_gguf(path)
    ref = gguf.GGUFReader(path)
    offsets = {t.name: int(t.data_offset) for t in ref.tensors}
    base = f.tensors["f32"].raw.data_ptr() - offsets["f32"]
    for name in expect:  # every tensor sits at its file offset inside one mapping
        assert f.tensors[name].raw.data_ptr() - base == offsets[name]
    raw = f.tensors["q6k"].raw
    del f
    gguf_file._cache.clear()
    gc.collect()
    assert raw.numpy().tobytes() == expect["q6k"][2]


def test_read_gguf_is_cached_until_the_file_changes(small, tmp_path):
    path, _ = small
    a = read_gguf(path)
    assert read_gguf(str(path)) is a
    other = tmp_path / "other.gguf"
    write_small(other, np.random.default_rng(1))
    assert read_gguf(other) is not a
    path.write_bytes(other.read_bytes())
    b = read_gguf(path)
    assert b is not a and b.tensors["f32"].raw.numpy().tobytes() == read_gguf(other).tensors["f32"].raw.numpy().tobytes()


def test_qtensor_to_copies_bytes_only(small):
    path, expect = small
    qt = read_gguf(path).tensors["q4k"]
    meta = qt.to("meta")
    assert meta.device.type == "meta" and meta.shape == qt.shape and meta.qtype is qt.qtype
    assert meta.raw.dtype == torch.uint8 and meta.raw.shape == qt.raw.shape
    cpu = qt.to(torch.device("cpu"))
    assert torch.equal(cpu.raw, qt.raw)
    assert "Q4_K" in repr(qt) and "(3, 512)" in repr(qt)


def test_qtensor_validates():
    raw = torch.zeros(2, 144, dtype=torch.uint8)
    qt = QTensor(raw, 12, (2, 256))
    assert qt.qtype is Q.Q4_K and qt.numel == 512
    assert QTensor(raw.view(-1), Q.Q4_K, (2, 256)).raw.shape == (2, 144)  # flat bytes are viewed to rows
    with pytest.raises(TypeError, match="uint8"):
        QTensor(raw.to(torch.int16), Q.Q4_K, (2, 256))
    with pytest.raises(ValueError, match="bytes"):
        QTensor(raw[:, :100].contiguous(), Q.Q4_K, (2, 256))
    with pytest.raises(ValueError, match="multiple"):
        QTensor(raw, Q.Q4_K, (2, 250))
    with pytest.raises(ValueError, match="quantization type"):
        QTensor(raw, 99, (2, 256))
    with pytest.raises(ValueError, match="contiguous"):
        QTensor(torch.zeros(144, 2, dtype=torch.uint8).t(), Q.Q4_K, (2, 256))


# --- broken files ------------------------------------------------------------


def _part_offset(field, index):
    return field.offset + sum(int(p.nbytes) for p in field.parts[:index])


def _patch(path, offset, data):
    b = bytearray(path.read_bytes())
    b[offset : offset + len(data)] = data
    path.write_bytes(bytes(b))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("definitely not a model\n")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(p)
    p.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(p)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")


def test_bad_magic(small):
    path, _ = small
    _patch(path, 0, b"GGML")
    with pytest.raises(GGUFError, match="magic"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [10, 30, 200, 9000])
def test_truncated_header(small, keep):
    path, _ = small
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(GGUFError, match="truncated|past the end"):
        read_gguf(path)


def test_truncated_tensor_data(small):
    path, _ = small
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="truncated|past the end"):
        read_gguf(path)


def test_tensor_data_past_end_of_file(small):
    path, _ = small
    field = gguf.GGUFReader(path).tensors[2].field
    _patch(path, _part_offset(field, 5), np.uint64(1 << 20).tobytes())
    with pytest.raises(GGUFError, match="truncated|past the end"):
        read_gguf(path)


def test_unknown_quant_type_id(small):
    path, _ = small
    field = gguf.GGUFReader(path).tensors[2].field
    _patch(path, _part_offset(field, 4), np.uint32(250).tobytes())
    with pytest.raises(GGUFError, match="unknown GGML quantization type id 250"):
        read_gguf(path)


def test_row_length_not_multiple_of_block(small):
    path, _ = small
    field = gguf.GGUFReader(path).tensors[2].field  # q4k: dims (512, 3) in GGUF order
    _patch(path, _part_offset(field, 3), np.uint64(500).tobytes())
    with pytest.raises(GGUFError, match="block size"):
        read_gguf(path)


def test_corrupt_metadata(small):
    path, _ = small
    ref = gguf.GGUFReader(path)
    key = "tokenizer.ggml.tokens"  # key length, key, value type, item type, then the array length
    _patch(path, ref.fields[key].offset + 8 + len(key) + 8, np.uint64(10**12).tobytes())
    with pytest.raises(GGUFError, match="past the end"):
        read_gguf(path)
    path2 = path.with_name("kv.gguf")
    write_small(path2, np.random.default_rng(0))
    _patch(path2, ref.fields["general.name"].offset + 8 + len("general.name"), np.uint32(77).tobytes())
    with pytest.raises(GGUFError, match="corrupt"):
        read_gguf(path2)


def test_big_endian_file_is_refused(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("f32", np.ones((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="byte order"):
        read_gguf(path)


def test_byte_count_larger_than_file(small):
    path, _ = small
    field = gguf.GGUFReader(path).tensors[4].field  # q6k, the last tensor: grow its rows
    _patch(path, _part_offset(field, 3) + 8, np.uint64(1000).tobytes())
    with pytest.raises(GGUFError, match="truncated|past the end"):
        read_gguf(path)


# --- the real file -----------------------------------------------------------


def test_gemma_file_matches_gguf_reader(gemma_gguf_path, gemma_reader_summary):
    f = read_gguf(gemma_gguf_path)
    ref = gemma_reader_summary
    assert f.architecture == "gemma3"
    assert list(f.tensors) == [t[0] for t in ref["tensors"]]
    mm = np.memmap(gemma_gguf_path, mode="r")
    for name, qtype, dims, n_elements, n_bytes, offset in ref["tensors"]:
        qt = f.tensors[name]
        assert qt.qtype is qtype
        assert qt.shape == tuple(reversed(dims)) and qt.numel == n_elements
        assert qt.nbytes == n_bytes
        assert np.array_equal(qt.raw.numpy().reshape(-1), mm[offset : offset + n_bytes]), name
    assert list(f.metadata) == list(ref["fields"])
    for k, v in ref["fields"].items():
        assert f.metadata[k] == v, k
    assert f.hparams["block_count"] == 18 == ref["fields"]["gemma3.block_count"]
