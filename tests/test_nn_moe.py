"""FusedMoE vs transformers' Qwen3MoeSparseMoeBlock holding the same (dequantized) weights."""

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from ferrum_mps.nn.moe import FusedMoE

MIXES = {  # qtypes (gate, up, down), hidden, expert width
    "q4k_q6k": ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256),
    "q8_0": ((Q.Q8_0,) * 3, 64, 96),
    "q5k": ((Q.Q5_K,) * 3, 256, 256),
}


def deq(raw, qtype, cols):
    w = gguf.quants.dequantize(raw.numpy(), Q(qtype)).astype(np.float32)
    return torch.from_numpy(w).reshape(raw.shape[0], raw.shape[1], cols)


def hf_block(E, k, H, inter, seed=0):
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True,
                         experts_implementation="eager")  # standalone block: transformers 5.0 has no default
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, H, generator=g) * 0.5)
        block.experts.gate_up_proj.copy_(torch.randn(E, 2 * inter, H, generator=g) * 0.1)
        block.experts.down_proj.copy_(torch.randn(E, H, inter, generator=g) * 0.1)
    return block


def load_dequantized(block, fm):
    """Give the HF block exactly the weights FusedMoE holds (reference dequantizer: gguf-py)."""
    H, inter = fm.hidden_size, fm.intermediate_size
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(
            torch.cat([deq(fm.gate_raw, fm.gate_qtype, H), deq(fm.up_raw, fm.up_qtype, H)], dim=1)
        )
        block.experts.down_proj.copy_(deq(fm.down_raw, fm.down_qtype, inter))


@pytest.fixture(scope="module")
def pair():
    """(HF block, FusedMoE) with the same weights. E = 8: FusedMoE.from_hf (quants.quantize). E = 128:
    8 quantized experts repeated 16 times (quantizing K-quants is slow), with 128 distinct router rows."""
    cache = {}

    def get(mix, E):
        if (mix, E) not in cache:
            qs, H, inter = MIXES[mix]
            if E == 8:
                block = hf_block(8, 2, H, inter, seed=E)
                fm = FusedMoE.from_hf(block, qs)
            else:
                _, small = get(mix, 8)
                block = hf_block(E, 2, H, inter, seed=E)
                stacks = (small.gate_raw, small.up_raw, small.down_raw)
                reps = [r.repeat(E // 8, 1, 1) for r in stacks]
                fm = FusedMoE(_router_copy(block), *reps, *qs, top_k=2)
            load_dequantized(block, fm)
            cache[mix, E] = block, fm
        return cache[mix, E]

    return get


def _router_copy(block):
    r = torch.nn.Linear(block.gate.weight.shape[1], block.gate.weight.shape[0], bias=False)
    with torch.no_grad():
        r.weight.copy_(block.gate.weight)
    return r


def set_top_k(block, fm, k):
    block.gate.top_k = fm.top_k = k


TS, KS = (1, 2, 7, 31, 32, 33, 100), (1, 2, 8)
# Every T x k for every mix at E = 8 and for Q8_0 at E = 128; K-quant stacks at E = 128 take a
# few cases each (dequantizing 128 K-quant experts per call is what makes a case slow on CPU).
CASES = (
    [(mix, 8, k, T) for mix in MIXES for k in KS for T in TS]
    + [("q8_0", 128, k, T) for k in KS for T in TS]
    + [("q4k_q6k", 128, k, T) for k, T in ((8, 1), (2, 7), (1, 33), (8, 100))]
    + [("q5k", 128, k, T) for k, T in ((8, 2), (2, 32))]
)


@pytest.mark.parametrize("mix,E,k,T", CASES)
def test_fused_moe_matches_hf_block(pair, mix, E, k, T):
    block, fm = pair(mix, E)
    set_top_k(block, fm, k)
    x = torch.randn(1, T, fm.hidden_size, generator=torch.Generator().manual_seed(T + k))
    with torch.no_grad():
        _, ref_w, ref_ids = block.gate(x.view(T, -1))
        ref = block(x)
        _, w, ids = fm.route(x.view(T, -1))
        out = fm(x)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)
    assert out.shape == ref.shape == x.shape
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err


def test_fused_moe_batched_shape_and_bfloat16(pair):
    block, fm = pair("q8_0", 8)
    set_top_k(block, fm, 2)
    x = torch.randn(3, 5, fm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fm(x), block(x), rtol=1e-4, atol=1e-5)
    # Casting the module keeps the raw uint8 stacks untouched; the router runs in bfloat16 like HF's.
    fm16 = FusedMoE.from_hf(block, Q.Q8_0).to(torch.bfloat16)
    block16 = copy.deepcopy(block).to(torch.bfloat16)
    assert fm16.gate_raw.dtype == torch.uint8 and fm16.gate.weight.dtype == torch.bfloat16
    x16 = x.to(torch.bfloat16)
    with torch.no_grad():
        y, ref = fm16(x16), block16(x16)
        assert torch.equal(fm16.route(x16.view(-1, fm.hidden_size))[2].long(), block16.gate(x16.view(-1, fm.hidden_size))[2])
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 3e-2


def write_layer(path, prefix, fm, router, router_dtype=None, **u32):
    """A GGUF file holding one MoE layer: the router array (raw_dtype router_dtype) and fm's expert stacks."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in u32.items():
        w.add_uint32(key.replace("__", "."), value)
    w.add_tensor(f"{prefix}.ffn_gate_inp.weight", router, raw_dtype=router_dtype)
    for name, raw, q in (("gate", fm.gate_raw, fm.gate_qtype), ("up", fm.up_raw, fm.up_qtype), ("down", fm.down_raw, fm.down_qtype)):
        w.add_tensor(f"{prefix}.ffn_{name}_exps.weight", raw.numpy(), raw_dtype=Q(q))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_gguf_reads_a_layer(tmp_path, pair):
    from ferrum_mps.gguf_file import read_gguf

    block, fm = pair("q4k_q6k", 8)
    set_top_k(block, fm, 2)
    path = tmp_path / "moe.gguf"
    write_layer(path, "blk.3", fm, block.gate.weight.detach().numpy(), qwen3moe__expert_used_count=2)
    f = read_gguf(path)
    loaded = FusedMoE.from_gguf(f.tensors, "blk.3", top_k=f.metadata["qwen3moe.expert_used_count"])
    assert (loaded.gate_qtype, loaded.up_qtype, loaded.down_qtype) == (int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K))
    x = torch.randn(1, 9, fm.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), block(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="blk.4.ffn_gate_inp.weight"):
        FusedMoE.from_gguf(f.tensors, "blk.4", top_k=2)


def test_from_gguf_quantized_router(tmp_path, pair):
    """A Q8_0 ffn_gate_inp (any non-float router) becomes a QuantLinear that routes like its dequantized weight."""
    from ferrum_mps.gguf_file import read_gguf
    from ferrum_mps.nn.linear import QuantLinear

    block, fm = pair("q8_0", 8)
    set_top_k(block, fm, 2)
    router_q = gguf.quants.quantize(block.gate.weight.detach().numpy(), Q.Q8_0)
    path = tmp_path / "moe_q8_router.gguf"
    write_layer(path, "blk.0", fm, router_q, Q.Q8_0)
    loaded = FusedMoE.from_gguf(read_gguf(path).tensors, "blk.0", top_k=2)
    assert isinstance(loaded.gate, QuantLinear) and loaded.gate.qtype == int(Q.Q8_0)
    ref = copy.deepcopy(block)
    with torch.no_grad():
        ref.gate.weight.copy_(torch.from_numpy(gguf.quants.dequantize(router_q, Q.Q8_0)))
        x = torch.randn(1, 5, fm.hidden_size)
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-4, atol=1e-5)


def test_bad_construction(pair):
    _, fm = pair("q8_0", 8)
    router = torch.nn.Linear(fm.hidden_size, 8, bias=False)
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(router, fm.gate_raw, fm.up_raw, fm.down_raw, 8, 8, 8, top_k=9)
    with pytest.raises(ValueError, match="down_raw"):
        FusedMoE(router, fm.gate_raw, fm.up_raw, fm.down_raw[:, :, :-2], 8, 8, 8, top_k=2)
    with pytest.raises(ValueError, match="qtypes"):
        FusedMoE.from_hf(hf_block(8, 2, 64, 96), (Q.Q8_0, Q.Q8_0))


class Layer(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm = torch.nn.LayerNorm(moe.hidden_size)
        self.mlp = moe

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_compiles_fullgraph_without_breaks(pair):
    _, fm = pair("q8_0", 128)
    fm.top_k = 8
    layer = Layer(fm).eval()
    x = torch.randn(2, 7, fm.hidden_size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        eager = layer(x)
        out = compiled(x)
        out1 = compiled(x[:, :1])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out1, layer(x[:, :1]), rtol=1e-5, atol=1e-6)
