"""ferrum::qkv_linear and ferrum::gate_up_act (CPU op and the one-launch Metal kernels under the harness)
against gguf-py's dequantize followed by a float64 matmul (and torch's silu / tanh-gelu)."""

import gguf
import pytest
import torch
import torch.nn.functional as F

import ferrum_mps.metal as metal
import ferrum_mps.ops  # noqa: F401
from ferrum_mps import shaders
from ferrum_mps.ops import fused_linear as FL
from test_metal_linear import _CountingCompiler, at_offset
from test_ops_linear import gguf_dequant, random_raw

Q = gguf.GGMLQuantizationType
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# q, k, v types: a Q4_K_M attention (v in Q6_K), Gemma-3-270M's (640-wide rows), and the other fused types
MIXES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q5_0, Q.Q5_0, Q.Q8_0), (Q.Q5_K, Q.Q4_0, Q.Q6_K)]
REF_ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh")}
NQ, NKV, NI = 10, 6, 9  # not multiples of the 4 rows of a threadgroup


def ref_linear(x, raw, qt, n, k):
    return x.reshape(-1, k).double() @ gguf_dequant(raw, qt, n, k).double().T


def check(y, ref, dtype):
    assert y.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y.cpu().reshape(ref.shape).double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def weights(types, rows, k, seed=0):
    return [random_raw(qt, n, k, seed=seed + i) for i, (qt, n) in enumerate(zip(types, rows))]


# ---------------------------------------------------------------------------------------------
# CPU op


@pytest.mark.parametrize("types", MIXES + [(Q.Q3_K, Q.F16, Q.Q4_K)], ids=lambda t: "-".join(q.name for q in t))
def test_cpu_qkv_matches_gguf(types):
    k = 256
    raws = weights(types, (NQ, NKV, NKV), k)
    x = torch.randn(2, 3, k)
    outs = torch.ops.ferrum.qkv_linear(x, raws[0], int(types[0]), raws[1], int(types[1]), raws[2], int(types[2]), NQ, NKV, k)
    for y, raw, qt, n in zip(outs, raws, types, (NQ, NKV, NKV)):
        assert y.shape == (2, 3, n)
        check(y, ref_linear(x, raw, qt, n, k), torch.float32)


@pytest.mark.parametrize("act", list(FL.ACTS))
def test_cpu_gate_up_matches_gguf(act):
    k = 256
    rg, ru = weights((Q.Q4_K, Q.Q6_K), (NI, NI), k)
    x = torch.randn(4, k)
    y = torch.ops.ferrum.gate_up_act(x, rg, int(Q.Q4_K), ru, int(Q.Q6_K), NI, k, act)
    ref = REF_ACT[act](ref_linear(x, rg, Q.Q4_K, NI, k)) * ref_linear(x, ru, Q.Q6_K, NI, k)
    check(y, ref, torch.float32)


def test_cpu_opcheck():
    k = 256
    rq, rk, rv = weights((Q.Q4_K, Q.Q4_K, Q.Q6_K), (NQ, NKV, NKV), k)
    x = torch.randn(1, k)
    torch.library.opcheck(torch.ops.ferrum.qkv_linear, (x, rq, int(Q.Q4_K), rk, int(Q.Q4_K), rv, int(Q.Q6_K), NQ, NKV, k))
    ru = random_raw(Q.Q6_K, NQ, k, seed=9)
    torch.library.opcheck(torch.ops.ferrum.gate_up_act, (x.half(), rq, int(Q.Q4_K), ru, int(Q.Q6_K), NQ, k, "silu"))


# ---------------------------------------------------------------------------------------------
# Metal under the harness


def _qkv(metal_device, types, m, k, dtype=torch.float32, seed=0):
    raws = weights(types, (NQ, NKV, NKV), k, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    counting = _CountingCompiler(shaders.get_shader_compiler())
    dev = metal_device
    with metal.use_shader_compiler(counting):
        outs = metal.qkv_linear(x.to(dev), at_offset(raws[0], dev), int(types[0]), at_offset(raws[1], dev, 4), int(types[1]),
                                raws[2].to(dev), int(types[2]), NQ, NKV, k)
    for y, raw, qt, n in zip(outs, raws, types, (NQ, NKV, NKV)):
        assert y.shape == (m, n)
        check(y, ref_linear(x, raw, qt, n, k), dtype)
    return counting.launches


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("types", MIXES, ids=lambda t: "-".join(q.name for q in t))
def test_metal_qkv_one_launch(metal_device, types, m):
    k = 256 if types[0] != Q.Q5_0 else 640
    assert _qkv(metal_device, types, m, k) == [f"qkv_{'mv' if m == 1 else 'mvb'}_f32"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_metal_qkv_low_precision(metal_device, dtype):
    assert _qkv(metal_device, MIXES[0], 1, 512, dtype) == [f"qkv_mv_{'f16' if dtype == torch.float16 else 'bf16'}"]


def test_metal_qkv_falls_back_to_qlinear(metal_device):
    """m > 8 (mat-mat) and types without a fused kernel: one qlinear per weight, same results."""
    assert _qkv(metal_device, MIXES[0], 9, 256) == ["mm_q4_k_f32", "mm_q4_k_f32", "mm_q6_k_f32"]
    assert _qkv(metal_device, (Q.Q4_K, Q.Q3_K, Q.Q6_K), 1, 256) == ["mv_q4_k_f32", "mv_q3_k_f32", "mv_q6_k_f32"]


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("act", list(FL.ACTS))
def test_metal_gate_up_one_launch(metal_device, act, m):
    k = 256
    types = (Q.Q4_K, Q.Q6_K) if act == "silu" else (Q.Q5_K, Q.Q8_0)
    rg, ru = weights(types, (NI, NI), k, seed=m)
    x = torch.randn(m, k)
    counting = _CountingCompiler(shaders.get_shader_compiler())
    dev = metal_device
    with metal.use_shader_compiler(counting):
        y = metal.gate_up_act(x.to(dev), rg.to(dev), int(types[0]), ru.to(dev), int(types[1]), NI, k, act)
    assert counting.launches == [f"gate_up_{'mv' if m == 1 else 'mvb'}_f32"]
    assert y.shape == (m, NI)
    check(y, REF_ACT[act](ref_linear(x, rg, types[0], NI, k)) * ref_linear(x, ru, types[1], NI, k), torch.float32)


def test_metal_gate_up_half_and_fallback(metal_device):
    k = 256
    rg, ru = weights((Q.Q4_0, Q.Q5_0), (NI, NI), k, seed=3)
    dev = metal_device
    for m, dtype in ((1, torch.float16), (9, torch.float32)):
        x = torch.randn(m, k).to(dtype)
        y = metal.gate_up_act(x.to(dev), rg.to(dev), int(Q.Q4_0), ru.to(dev), int(Q.Q5_0), NI, k, "gelu_pytorch_tanh")
        ref = F.gelu(ref_linear(x, rg, Q.Q4_0, NI, k), approximate="tanh") * ref_linear(x, ru, Q.Q5_0, NI, k)
        check(y, ref, dtype)


def test_metal_real_gemma_weights(metal_device, gemma_gguf_path):
    """llama.cpp-made blk.0 attn_q/k/v (Q5_0, Q5_0, Q8_0) and ffn_gate/up rows, 640 wide, in one launch each."""
    from ferrum_mps.gguf_file import read_gguf

    f = read_gguf(gemma_gguf_path)
    t = {r: f.tensors[f"blk.0.{r}.weight"] for r in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")}
    k = t["attn_q"].shape[1]
    rows = {"attn_q": 12, "attn_k": 8, "attn_v": 8, "ffn_gate": 8, "ffn_up": 8}  # a few rows keep the harness short
    raw = {r: t[r].raw[:n].contiguous() for r, n in rows.items()}
    x = torch.randn(1, k)
    dev = metal_device
    outs = metal.qkv_linear(x.to(dev), raw["attn_q"].to(dev), int(t["attn_q"].qtype), raw["attn_k"].to(dev), int(t["attn_k"].qtype),
                            raw["attn_v"].to(dev), int(t["attn_v"].qtype), 12, 8, k)
    for y, r in zip(outs, ("attn_q", "attn_k", "attn_v")):
        check(y, ref_linear(x, raw[r], t[r].qtype, rows[r], k), torch.float32)
    y = metal.gate_up_act(x.to(dev), raw["ffn_gate"].to(dev), int(t["ffn_gate"].qtype), raw["ffn_up"].to(dev), int(t["ffn_up"].qtype), 8, k,
                          "gelu_pytorch_tanh")
    g, u = (ref_linear(x, raw[r], t[r].qtype, 8, k) for r in ("ffn_gate", "ffn_up"))
    check(y, F.gelu(g, approximate="tanh") * u, torch.float32)


def test_bad_input_raises(metal_device):
    k = 256
    rq, rk, rv = (r.to(metal_device) for r in weights((Q.Q4_K, Q.Q4_K, Q.Q6_K), (NQ, NKV, NKV), k))
    x = torch.randn(1, k).to(metal_device)
    for qkv, gu in ((torch.ops.ferrum.qkv_linear, torch.ops.ferrum.gate_up_act), (metal.qkv_linear, metal.gate_up_act)):
        with pytest.raises(ValueError, match="raw_v has"):
            qkv(x, rq, int(Q.Q4_K), rk, int(Q.Q4_K), rv, int(Q.Q4_K), NQ, NKV, k)
        with pytest.raises(ValueError, match="in_features=256"):
            qkv(x[:, :128], rq, int(Q.Q4_K), rk, int(Q.Q4_K), rv, int(Q.Q6_K), NQ, NKV, k)
        with pytest.raises(ValueError, match="act must be one of"):
            gu(x, rk, int(Q.Q4_K), rk, int(Q.Q4_K), NKV, k, "relu")
        with pytest.raises(ValueError, match="raw_up has"):
            gu(x, rk, int(Q.Q4_K), rq, int(Q.Q4_K), NKV, k, "silu")


def test_registered_as_the_mps_implementations():
    for op, fn in (("qkv_linear", FL.qkv_linear_mps), ("gate_up_act", FL.gate_up_act_mps)):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ferrum::{op}", "MPS")
        assert getattr(metal, op) is fn
