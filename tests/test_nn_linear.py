"""QuantLinear / QuantEmbedding vs plain torch modules on gguf-py-dequantized weights."""

import types

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from ferrum_mps.nn.linear import QuantEmbedding, QuantLinear
from test_ops_linear import gguf_dequant, random_raw

Q = gguf.GGMLQuantizationType


def qtensor(qt, rows, cols, seed=0):
    """Duck-typed QTensor (raw, qtype, shape), as ferrum_mps.gguf_file returns."""
    return types.SimpleNamespace(raw=random_raw(qt, rows, cols, seed), qtype=qt, shape=(rows, cols))


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.F16], ids=lambda q: q.name)
def test_quantlinear_matches_nn_linear(qt):
    t = qtensor(qt, 12, 256, seed=1)
    bias = torch.randn(12)
    m = QuantLinear.from_qtensor(t, bias=bias)
    ref = torch.nn.Linear(256, 12)
    with torch.no_grad():
        ref.weight.copy_(gguf_dequant(t.raw, qt, 12, 256))
        ref.bias.copy_(bias)
    x = torch.randn(2, 5, 256)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert m.raw.data_ptr() == t.raw.data_ptr()  # no copy of the bytes
    assert f"qtype={qt.name}" in repr(m) and "in_features=256" in repr(m) and "out_features=12" in repr(m)


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_from_float_roundtrip(qt):
    lin = torch.nn.Linear(256, 8)
    m = QuantLinear.from_float(lin, qt)
    assert m.qtype == int(qt) and m.raw.dtype == torch.uint8
    w = gguf_dequant(m.raw, qt, 8, 256)  # gguf-py reads our bytes
    rel = (w - lin.weight.detach()).norm() / lin.weight.detach().norm()
    assert rel < {Q.Q4_0: 0.15, Q.Q5_0: 0.08, Q.Q4_K: 0.12, Q.Q5_K: 0.06}.get(qt, 0.02)
    x = torch.randn(3, 256)
    torch.testing.assert_close(m(x), x @ w.T + lin.bias.detach(), rtol=1e-5, atol=1e-5)


def test_state_dict_and_safetensors_keep_qtype(tmp_path):
    src = QuantLinear.from_qtensor(qtensor(Q.Q6_K, 4, 512, seed=2), bias=torch.randn(4))
    path = tmp_path / "layer.safetensors"
    save_file(src.state_dict(), path)
    dst = QuantLinear(512, 4, Q.Q4_K, bias=True)  # built with another qtype: the file's wins
    dst.load_state_dict(load_file(path))
    assert dst.qtype == int(Q.Q6_K) and dst.raw.shape == src.raw.shape
    x = torch.randn(2, 512)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    same = QuantLinear(512, 4, Q.Q6_K, bias=True)
    same.load_state_dict(src.state_dict())
    torch.testing.assert_close(same(x), src(x), rtol=0, atol=0)


def test_to_device_and_dtype_keep_raw_bytes():
    m = QuantLinear.from_qtensor(qtensor(Q.Q4_K, 4, 256), bias=torch.randn(4))
    before = m.raw.clone()
    m = m.to("meta").to_empty(device="cpu")  # the device round trip copies raw bytes as bytes
    assert m.raw.dtype == torch.uint8 and m.raw.shape == before.shape
    h = QuantLinear.from_qtensor(qtensor(Q.Q4_K, 4, 256), bias=torch.randn(4)).half()
    assert h.raw.dtype == torch.uint8 and torch.equal(h.raw, before) and h.bias.dtype == torch.float16
    assert h(torch.randn(1, 256).half()).dtype == torch.float16


def test_bad_construction():
    with pytest.raises(ValueError, match="block size"):
        QuantLinear(100, 4, Q.Q4_K)
    with pytest.raises(ValueError, match="unsupported|unknown"):
        QuantLinear(256, 4, 1234)
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear.from_qtensor(types.SimpleNamespace(raw=torch.zeros(2, 2, 144, dtype=torch.uint8), qtype=Q.Q4_K, shape=(2, 2, 256)))
    with pytest.raises(ValueError, match="in_features=256"):
        QuantLinear.from_qtensor(qtensor(Q.Q4_K, 4, 256))(torch.randn(1, 512))


def test_quantembedding_matches_nn_embedding():
    t = qtensor(Q.Q6_K, 20, 256, seed=3)
    m = QuantEmbedding.from_qtensor(t)
    ref = torch.nn.Embedding.from_pretrained(gguf_dequant(t.raw, Q.Q6_K, 20, 256))
    ids = torch.tensor([[0, 19, 5], [5, 5, 2]])
    torch.testing.assert_close(m(ids), ref(ids), rtol=0, atol=0)
    assert "qtype=Q6_K" in repr(m)


def test_modules_compile_fullgraph():
    emb = QuantEmbedding.from_qtensor(qtensor(Q.Q8_0, 10, 64, seed=4))
    lin = QuantLinear.from_qtensor(qtensor(Q.Q4_K, 6, 256, seed=5), bias=torch.randn(6))
    model = torch.nn.Sequential(emb, torch.nn.Flatten(-2), lin)
    ids = torch.tensor([[1, 2, 3, 9]])
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_real_gemma_tensors(gemma_gguf_path):
    """QuantLinear/QuantEmbedding on llama.cpp-made Q4_K/Q6_K/Q5_0/Q8_0 tensors vs gguf-py's dequantization of the same bytes."""
    from ferrum_mps.gguf_file import read_gguf

    f = read_gguf(gemma_gguf_path)
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.0.attn_k.weight", "blk.0.attn_q.weight"):
        qt = f.tensors[name]
        out_f, in_f = qt.shape
        m = QuantLinear.from_qtensor(qt)
        w = torch.from_numpy(gguf.quants.dequantize(qt.raw.numpy(), qt.qtype).copy()).reshape(out_f, in_f)
        x = torch.randn(3, in_f)
        torch.testing.assert_close(m(x), (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5 * w.abs().max().item() * in_f**0.5)
    table = f.tensors["token_embd.weight"]
    emb = QuantEmbedding.from_qtensor(table)
    ids = torch.tensor([0, 2, 106, 262143, 2])
    rows = gguf.quants.dequantize(table.raw[ids].numpy(), table.qtype)
    torch.testing.assert_close(emb(ids), torch.from_numpy(rows.copy()), rtol=0, atol=0)
