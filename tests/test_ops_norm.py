"""ferrum::rms_norm, add_rms_norm, qk_norm_rope_cache, moe_gate_route (ferrum_mps/ops/norm.py, metal_ops/norm.metal).

The CPU ops are checked against transformers' modules on the same weights (Qwen3RMSNorm,
Gemma3RMSNorm with GGUF's stored (1 + w), Qwen3/Llama rotary embeddings incl. llama3 freq
factors and linear scaling, apply_rotary_pos_emb, Qwen3MoeTopKRouter); the Metal kernels run
under the Metal-on-CPU harness (`metal_device`) against the CPU ops on the same inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

import ferrum_mps.metal as metal
import ferrum_mps.ops.norm as norm_ops

ops = torch.ops.ferrum
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One rounding step of the activation dtype (the kernels round where torch rounds; cos/sin and
# the order of float32 sums may still move a value across a rounding boundary).
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def gguf_inv_freq(D, theta, scale=1.0, factors=None):
    """llama.cpp's rope frequencies: theta^(-2i/D), divided by rope_freqs.weight[i] and by the linear scale factor."""
    f = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    if factors is not None:
        f = f / factors
    return f / scale


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(got, ref, dtype):
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got.detach().cpu().float(), ref.detach().float(), **TOL[dtype])


# ------------------------------------------------------------------------- CPU ops vs transformers


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_qwen3_rmsnorm(dtype):
    H = 96
    ref = Qwen3RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(H, generator=gen(1)))
    ref = ref.to(dtype)
    x = (3 * torch.randn(2, 5, H, generator=gen(2))).to(dtype)
    got = ops.rms_norm(x, ref.weight.detach(), 1e-6)
    assert got.shape == x.shape
    close(got, ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gemma_convention(dtype):
    # Gemma3RMSNorm multiplies by (1 + w); GGUF files store 1 + w, which our plain norm multiplies by.
    H = 64
    ref = Gemma3RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(0.3 * torch.randn(H, generator=gen(3)))
    x = torch.randn(4, H, generator=gen(4)).to(dtype)
    got = ops.rms_norm(x, (1 + ref.weight.detach()).to(dtype), 1e-6)
    close(got, ref(x), dtype)  # Gemma rounds once, we twice (w * T(x_hat)): within one step


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_residual_then_qwen3_rmsnorm(dtype):
    H = 64
    ref = Qwen3RMSNorm(H, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(H, generator=gen(5)))
    ref = ref.to(dtype)
    x, res = (torch.randn(3, H, generator=gen(s)).to(dtype) for s in (6, 7))
    normed, s = ops.add_rms_norm(x, res, ref.weight.detach(), 1e-5)
    assert torch.equal(s, res + x)  # the residual stream in the activation dtype
    close(normed, ref(res + x), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_norm_float32_residual_stream(dtype):
    # Half activations, float32 residual stream: the sum stays float32, the normed output is x's dtype.
    H = 64
    ref = Qwen3RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(H, generator=gen(11)))
    x, res = torch.randn(3, H, generator=gen(12)).to(dtype), 100 * torch.randn(3, H, generator=gen(13))
    normed, s = ops.add_rms_norm(x, res, ref.weight.detach().to(dtype), 1e-6)
    assert s.dtype == torch.float32 and normed.dtype == dtype
    assert torch.equal(s, res + x.float())
    close(normed, ref(res + x.float()).to(dtype), dtype)  # float32 module, then one rounding


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_pre_weight_matches_gemma3_sandwich(dtype):
    # Gemma3DecoderLayer: residual + post_attention_layernorm(h), then pre_feedforward_layernorm of the sum.
    # GGUF stores (1 + w) for both norms, which our plain norms multiply by.
    H = 64
    post, pre_ffn = Gemma3RMSNorm(H, eps=1e-6), Gemma3RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        post.weight.copy_(0.3 * torch.randn(H, generator=gen(14)))
        pre_ffn.weight.copy_(0.3 * torch.randn(H, generator=gen(15)))
    h, res = (3 * torch.randn(2, 3, H, generator=gen(16))).to(dtype), torch.randn(2, 3, H, generator=gen(17)).to(dtype)
    normed, s = ops.add_rms_norm(h, res, (1 + pre_ffn.weight.detach()).to(dtype), 1e-6,
                                 (1 + post.weight.detach()).to(dtype))
    with torch.no_grad():
        ref_s = res + post(h)
        ref_n = pre_ffn(ref_s)
    # Gemma rounds once per norm, we twice (w * T(x_hat)), and the sum rounds once more: two steps
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    torch.testing.assert_close(s.float(), ref_s.float(), **tol)
    torch.testing.assert_close(normed.float(), ref_n.float(), **tol)
    # and exactly the two-op composition the model used before the fusion
    n0, s0 = ops.add_rms_norm(ops.rms_norm(h, (1 + post.weight.detach()).to(dtype), 1e-6), res,
                              (1 + pre_ffn.weight.detach()).to(dtype), 1e-6)
    assert torch.equal(s, s0) and torch.equal(normed, n0)


def hf_rope(x_bhtd, cos, sin):
    """transformers' apply_rotary_pos_emb on one tensor [B, H, T, D] (cos/sin [B, T, D], float32)."""
    out, _ = apply_rotary_pos_emb(x_bhtd, x_bhtd, cos, sin)
    return out


def qk_inputs(B, T, Hq, Hkv, D, dtype, seed):
    q = torch.randn(B, T, Hq, D, generator=gen(seed)).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=gen(seed + 1)).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=gen(seed + 2)).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("theta", [10000.0, 1e6])  # per-layer bases arrive through inv_freq
def test_qk_norm_rope_cache_matches_qwen3(dtype, theta):
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 32, 8
    cfg = Qwen3Config(head_dim=D, hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, rope_theta=theta)
    rot = Qwen3RotaryEmbedding(cfg)
    qn, kn = Qwen3RMSNorm(D, 1e-6), Qwen3RMSNorm(D, 1e-6)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(D, generator=gen(8)))
        kn.weight.copy_(1 + 0.2 * torch.randn(D, generator=gen(9)))
    qn, kn = qn.to(dtype), kn.to(dtype)
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, dtype, 10)
    pos = torch.tensor([[7, 8, 9], [0, 1, 30000]])
    cache_pos = torch.tensor([5, 6, 7])
    k_cache = torch.full((B, Hkv, S, D), 9.0, dtype=dtype)
    v_cache = k_cache.clone()
    torch.testing.assert_close(gguf_inv_freq(D, theta), rot.inv_freq, rtol=4e-7, atol=0)
    q_out = ops.qk_norm_rope_cache(q, k, v, qn.weight.detach(), kn.weight.detach(), 1e-6, rot.inv_freq,
                                   pos, False, k_cache, v_cache, cache_pos)

    cos, sin = rot(q.float(), pos)  # float32 rope on the normed values (the model's rope runs in float32)
    with torch.no_grad():
        q_ref = hf_rope(qn(q).transpose(1, 2).float(), cos, sin).to(dtype)
        k_ref = hf_rope(kn(k).transpose(1, 2).float(), cos, sin).to(dtype)
    assert q_out.shape == (B, Hq, T, D) and q_out.dtype == dtype
    close(q_out, q_ref, dtype)
    close(k_cache[:, :, 5:], k_ref, dtype)
    assert torch.equal(v_cache[:, :, 5:], v.transpose(1, 2))
    assert (k_cache[:, :, :5] == 9).all() and (v_cache[:, :, :5] == 9).all()  # other slots untouched


def llama3_freq_factors(D, theta, factor, low, high, old_ctx):
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for llama3 rope scaling."""
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    lo_wl, hi_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def to_gguf_order(x):
    """HF rotate-half head layout -> GGUF's permuted llama q/k layout: (i, i + D/2) -> (2i, 2i + 1)."""
    D = x.shape[-1]
    return torch.stack((x[..., : D // 2], x[..., D // 2 :]), -1).flatten(-2)


@pytest.mark.parametrize("scaling", ["llama3", "linear"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_qk_rope_matches_llama_scaled_rope(scaling, interleaved):
    B, T, Hq, Hkv, D, S, theta = 1, 4, 2, 1, 32, 6, 500000.0
    if scaling == "llama3":
        params = dict(rope_type="llama3", rope_theta=theta, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
        inv_freq = gguf_inv_freq(D, theta, factors=llama3_freq_factors(D, theta, 8.0, 1.0, 4.0, 64))
    else:
        params = dict(rope_type="linear", rope_theta=theta, factor=4.0)
        inv_freq = gguf_inv_freq(D, theta, scale=4.0)
    cfg = LlamaConfig(head_dim=D, hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, rope_parameters=params)
    rot = LlamaRotaryEmbedding(cfg)
    # llama.cpp's route (base / freq factors from the file / scale) gives transformers' frequencies
    # up to float32 rounding (1 ulp in llama3's smooth band)...
    torch.testing.assert_close(inv_freq, rot.inv_freq, rtol=4e-7, atol=0)
    # ...and the op turns whatever inv_freq it gets exactly as transformers' apply_rotary_pos_emb does.
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, torch.float32, 20)  # in HF's (rotate-half) head layout
    pos = torch.tensor([[3, 100, 1000, 5000]])
    k_cache, v_cache = torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)
    lay = to_gguf_order if interleaved else (lambda t: t)
    q_out = ops.qk_norm_rope_cache(lay(q), lay(k), lay(v), None, None, 1e-6, rot.inv_freq, pos, interleaved,
                                   k_cache, v_cache, torch.arange(T))
    cos, sin = rot(q, pos)
    close(q_out, lay(hf_rope(q.transpose(1, 2), cos, sin)), torch.float32)
    close(k_cache[:, :, :T], lay(hf_rope(k.transpose(1, 2), cos, sin)), torch.float32)
    assert torch.equal(v_cache[:, :, :T], lay(v).transpose(1, 2))


def test_qk_norm_rope_cache_rejects_bad_slots_on_cpu():
    q, k, v = qk_inputs(1, 2, 2, 1, 8, torch.float32, 0)
    kc, vc = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    for bad in ([0, 4], [-1, 1]):
        with pytest.raises(ValueError, match="outside the cache of 4 slots"):
            ops.qk_norm_rope_cache(q, k, v, None, None, 1e-6, torch.ones(4), torch.zeros(1, 2, dtype=torch.long), False,
                                   kc, vc, torch.tensor(bad))
    assert not kc.any() and not vc.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_moe_gate_route_matches_qwen3_moe_router(dtype, normalize):
    E, H, k = 16, 64, 4
    cfg = Qwen3MoeConfig(num_experts=E, num_experts_per_tok=k, hidden_size=H, norm_topk_prob=normalize)
    router = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=gen(30)) / 4)
    router = router.to(dtype)
    x = torch.randn(7, H, generator=gen(31)).to(dtype)
    w, ids = ops.moe_gate_route(x, router.weight.detach(), k, normalize)
    _, ref_w, ref_ids = router(x)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    # transformers casts the weights to its logits' dtype (5.0: float32 probabilities); ours stay float32.
    close(w.to(ref_w.dtype), ref_w, dtype)


def test_moe_gate_route_undefined_softmax_gives_no_expert():
    x, W = torch.randn(4, 32, generator=gen(32)), torch.randn(8, 32, generator=gen(33))
    W[:, 0] = W[:, 0].abs() + 0.1
    x[0, 3], x[1, 0], x[2, 0] = math.nan, math.inf, -math.inf  # NaN, +inf and all -inf logits
    w, ids = ops.moe_gate_route(x, W, 3, True)
    assert (ids[:3] == -1).all() and (w[:3] == 0).all()
    rw, rids = ops.moe_route(x[3:] @ W.T, 3, True)
    assert torch.equal(ids[3:], rids) and torch.allclose(w[3:], rw)


def test_opcheck():
    x, r, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(ops.rms_norm.default, (x.half(), w.half(), 1e-6))
    torch.library.opcheck(ops.add_rms_norm.default, (x, r, w, 1e-6))
    torch.library.opcheck(ops.add_rms_norm.default, (x, r, w, 1e-6, torch.randn(16)))
    q, k, v = qk_inputs(1, 2, 4, 2, 8, torch.float32, 40)
    args = (q, k, v, torch.randn(8), torch.randn(8), 1e-6, torch.rand(4), torch.tensor([[3, 4]]), False,
            torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), torch.tensor([3, 4]))
    torch.library.opcheck(ops.qk_norm_rope_cache.default, args)
    torch.library.opcheck(ops.qk_norm_rope_cache.default, args[:3] + (None, None) + args[5:8] + (True,) + args[9:])
    torch.library.opcheck(ops.moe_gate_route.default, (x, torch.randn(8, 16), 2, True))


def test_compiled_fullgraph_matches_eager():
    """The four ops in one torch.compile(fullgraph=True) graph on CPU, caches updated in place."""
    B, T, Hq, Hkv, D, S, H = 1, 2, 4, 2, 16, 6, 32
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, torch.float32, 50)
    x, res, w, rw = torch.randn(T, H), torch.randn(T, H), torch.randn(H), torch.randn(8, H)
    qw, kw, inv = torch.randn(D), torch.randn(D), gguf_inv_freq(D, 10000.0)

    def step(x, res, q, k, v, k_cache, v_cache, cache_position):
        h = ops.rms_norm(x, w, 1e-6)
        n, s = ops.add_rms_norm(h, res, w, 1e-6)
        weights, ids = ops.moe_gate_route(n, rw, 2, True)
        pos = cache_position[None].expand(B, -1)
        q_out = ops.qk_norm_rope_cache(q, k, v, qw, kw, 1e-6, inv, pos, False, k_cache, v_cache, cache_position)
        return q_out * 2, s, weights, ids

    caches = [torch.zeros(B, Hkv, S, D) for _ in range(4)]
    cp = torch.tensor([2, 3])
    got, code = run_and_get_code(torch.compile(step, fullgraph=True), x, res, q, k, v, caches[0], caches[1], cp)
    # Inductor re-inplaces the mutation: the op writes the caches it was given, no O(cache) copy.
    assert "ferrum.qk_norm_rope_cache" in code[0]
    assert "clone" not in code[0] and "copy_" not in code[0], code[0]
    ref = step(x, res, q, k, v, caches[2], caches[3], cp)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(caches[0], caches[2])
    torch.testing.assert_close(caches[1], caches[3])
    assert caches[0][:, :, 2:4].abs().sum() > 0


def test_bad_input_names_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="activation dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.float16), 1e-6)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.rms_norm(x.long(), torch.ones(8), 1e-6)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        norm_ops.rms_norm_cpu(x, [1.0] * 8, 1e-6)
    with pytest.raises(ValueError, match="same device, got x on cpu, weight on meta"):
        norm_ops.rms_norm_cpu(x, torch.ones(8, device="meta"), 1e-6)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_rms_norm(x, torch.randn(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"pre_weight must have shape \(8,\)"):
        ops.add_rms_norm(x, x, torch.ones(8), 1e-6, torch.ones(9))
    with pytest.raises(TypeError, match="residual must be torch.float16"):
        ops.add_rms_norm(x.half(), torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float16), 1e-6)
    q, k, v = qk_inputs(1, 2, 2, 1, 8, torch.float32, 0)
    kc = torch.zeros(1, 1, 4, 8)
    ok = dict(inv=torch.ones(4), pos=torch.zeros(1, 2, dtype=torch.long), cp=torch.tensor([0, 1]))

    def qk(inv=ok["inv"], pos=ok["pos"], cp=ok["cp"], kc=kc, k=k):
        return ops.qk_norm_rope_cache(q, k, v, None, None, 1e-6, inv, pos, False, kc, kc.clone(), cp)

    with pytest.raises(ValueError, match=r"inv_freq must be a float32 tensor of shape \(4,\)"):
        qk(inv=torch.ones(8))
    with pytest.raises(TypeError, match="position_ids must be int64"):
        qk(pos=ok["pos"].int())
    with pytest.raises(ValueError, match=r"cache_position must have shape \(2,\)"):
        qk(cp=torch.tensor([0]))
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        qk(kc=torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="k and v must be"):
        qk(k=torch.randn(1, 2, 1, 6))
    with pytest.raises(ValueError, match="top_k must be in"):
        ops.moe_gate_route(x, torch.randn(4, 8), 5, True)
    with pytest.raises(ValueError, match="router_weight must be"):
        ops.moe_gate_route(x, torch.randn(4, 9), 2, True)


# ------------------------------------------------------------------------- Metal kernels vs CPU ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [64, 70, 1536])  # vector loads; scalar loads (H % 4 != 0); 384 float4s on 512 threads
def test_metal_rms_norm(metal_device, dtype, H):
    x = (2 * torch.randn(3, H, generator=gen(H))).to(dtype)
    w = (1 + 0.2 * torch.randn(H, generator=gen(H + 1))).to(dtype)
    got = metal.rms_norm(x.to(metal_device), w.to(metal_device), 1e-6)
    close(got, ops.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype,rdtype", [(t, t) for t in DTYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_metal_add_rms_norm(metal_device, dtype, rdtype):
    H = 128
    x, res = torch.randn(2, 3, H, generator=gen(60)).to(dtype), torch.randn(2, 3, H, generator=gen(61)).to(rdtype)
    w = (1 + 0.2 * torch.randn(H, generator=gen(62))).to(dtype)
    normed, s = metal.add_rms_norm(x.to(metal_device), res.to(metal_device), w.to(metal_device), 1e-5)
    ref_n, ref_s = ops.add_rms_norm(x, res, w, 1e-5)
    assert s.dtype == rdtype and torch.equal(s.cpu(), ref_s)
    close(normed, ref_n, dtype)


@pytest.mark.parametrize("dtype,rdtype,H", [(torch.float32, torch.float32, 128), (torch.float16, torch.float16, 70),
                                             (torch.bfloat16, torch.float32, 128)])
def test_metal_add_rms_norm_pre_weight(metal_device, dtype, rdtype, H):
    x, res = (3 * torch.randn(2, 3, H, generator=gen(66))).to(dtype), torch.randn(2, 3, H, generator=gen(67)).to(rdtype)
    w, pw = ((1 + 0.2 * torch.randn(H, generator=gen(s))).to(dtype) for s in (68, 69))
    d = metal_device
    normed, s = metal.add_rms_norm(x.to(d), res.to(d), w.to(d), 1e-6, pw.to(d))
    ref_n, ref_s = ops.add_rms_norm(x, res, w, 1e-6, pw)
    assert s.dtype == rdtype
    close(s, ref_s, dtype)
    close(normed, ref_n, dtype)


def test_metal_norms_take_misaligned_rows(metal_device):
    # A view starting 1 element into its storage: 4-wide loads would be misaligned, the scalar variant runs.
    buf, res = torch.randn(1 + 2 * 64, generator=gen(63)), torch.randn(2, 64, generator=gen(64))
    x, w = buf[1:].view(2, 64), torch.randn(64, generator=gen(65))
    d = metal_device  # (.to("cpu") keeps the view; a copy to MPS is aligned again)
    close(metal.rms_norm(x.to(d), w.to(d), 1e-6), ops.rms_norm(x, w, 1e-6), torch.float32)
    n, _ = metal.add_rms_norm(x.to(d), res.to(d), w.to(d), 1e-6)
    close(n, ops.add_rms_norm(x, res, w, 1e-6)[0], torch.float32)


QK_CASES = [  # dtype, cache dtype, interleaved, qk norm, head dim
    (torch.float32, torch.float32, False, True, 64),
    (torch.float16, torch.float16, False, True, 64),
    (torch.bfloat16, torch.bfloat16, True, True, 32),
    (torch.float16, torch.float32, True, False, 80),  # 40 pairs: a partly idle second simdgroup
    (torch.bfloat16, torch.float16, False, False, 16),
]


@pytest.mark.parametrize("dtype,cache_dtype,interleaved,norm,D", QK_CASES)
def test_metal_qk_norm_rope_cache(metal_device, dtype, cache_dtype, interleaved, norm, D):
    B, T, Hq, Hkv, S = 2, 2, 4, 2, 5
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, dtype, D)
    qw, kw = ((1 + 0.2 * torch.randn(D, generator=gen(s))).to(dtype) if norm else None for s in (1, 2))
    inv = gguf_inv_freq(D, 10000.0)
    pos = torch.tensor([[4, 3], [20000, 1]])
    cp = torch.tensor([3, 1])
    kc = torch.randn(B, Hkv, S, D, generator=gen(3)).to(cache_dtype)
    vc = torch.randn(B, Hkv, S, D, generator=gen(4)).to(cache_dtype)
    d = metal_device
    mk, mv = kc.clone().to(d), vc.clone().to(d)  # clone: .to("cpu") would alias the reference caches
    got = metal.qk_norm_rope_cache(q.to(d), k.to(d), v.to(d), None if qw is None else qw.to(d), None if kw is None else kw.to(d),
                                   1e-6, inv.to(d), pos.to(d), interleaved, mk, mv, cp.to(d))
    ref = ops.qk_norm_rope_cache(q, k, v, qw, kw, 1e-6, inv, pos, interleaved, kc, vc, cp)
    close(got, ref, dtype)
    close(mk, kc, dtype if cache_dtype == torch.float32 else cache_dtype)
    assert torch.equal(mv.cpu(), vc)


def test_metal_qk_positions_expanded_over_batch(metal_device):
    # decode_step passes cache_position[None].expand(B, -1): read in place (row stride 0), no copy.
    B, T, Hq, Hkv, D, S = 2, 2, 2, 1, 16, 4
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, torch.float16, 90)
    inv, cp = gguf_inv_freq(D, 1e6), torch.tensor([1, 2])
    d = metal_device
    kc, vc = torch.zeros(B, Hkv, S, D, dtype=torch.float16), torch.zeros(B, Hkv, S, D, dtype=torch.float16)
    mk, mv = kc.clone().to(d), vc.clone().to(d)
    cpd = cp.to(d)
    got = metal.qk_norm_rope_cache(q.to(d), k.to(d), v.to(d), None, None, 1e-6, inv.to(d), cpd[None].expand(B, -1), False, mk, mv, cpd)
    ref = ops.qk_norm_rope_cache(q, k, v, None, None, 1e-6, inv, cp[None].expand(B, -1).contiguous(), False, kc, vc, cp)
    close(got, ref, torch.float16)
    close(mk, kc, torch.float16)
    assert torch.equal(mv.cpu(), vc)


def test_metal_qk_skips_out_of_range_slots(metal_device):
    B, T, Hq, Hkv, D, S = 1, 3, 2, 1, 16, 4
    q, k, v = qk_inputs(B, T, Hq, Hkv, D, torch.float32, 70)
    inv, pos = gguf_inv_freq(D, 10000.0), torch.tensor([[0, 1, 2]])
    kc, vc = torch.full((B, Hkv, S, D), 7.0), torch.full((B, Hkv, S, D), 7.0)
    d = metal_device
    mk, mv = kc.clone().to(d), vc.clone().to(d)  # clone: .to("cpu") would alias the reference caches
    bad = torch.tensor([S, 2, -1])  # only token 1 has a slot; the kernel must not write elsewhere
    got = metal.qk_norm_rope_cache(q.to(d), k.to(d), v.to(d), None, None, 1e-6, inv.to(d), pos.to(d), False, mk, mv, bad.to(d))
    ref = ops.qk_norm_rope_cache(q, k, v, None, None, 1e-6, inv, pos, False, kc, vc, torch.tensor([0, 2, 1]))
    close(got, ref, torch.float32)  # q is still computed for every token
    mk, mv = mk.cpu(), mv.cpu()
    close(mk[:, :, 2], kc[:, :, 2], torch.float32)
    assert torch.equal(mv[:, :, 2], vc[:, :, 2])
    for slot in (0, 1, 3):
        assert (mk[:, :, slot] == 7).all() and (mv[:, :, slot] == 7).all()


def lowest_index_route(logits, k, normalize):
    """Softmax, then a stable descending sort: exact ties to the lower expert index."""
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    w = probs.gather(1, ids)
    return (w / w.sum(-1, keepdim=True) if normalize else w), ids.to(torch.int32)


ROUTE_CASES = [  # x dtype, router dtype, experts, hidden, top_k
    (torch.float32, torch.float32, 8, 64, 2),
    (torch.float32, torch.float32, 40, 36, 3),  # H % 4 != 0: scalar loads
    (torch.float16, torch.float16, 128, 64, 8),
    (torch.float16, torch.float32, 16, 32, 4),
    (torch.bfloat16, torch.bfloat16, 256, 32, 8),
    (torch.bfloat16, torch.float32, 8, 32, 8),
]


@pytest.mark.parametrize("dtype,wdtype,E,H,k", ROUTE_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_metal_moe_gate_route(metal_device, dtype, wdtype, E, H, k, normalize):
    x = torch.randn(5, H, generator=gen(E + H)).to(dtype)
    W = (torch.randn(E, H, generator=gen(E)) / 4).to(wdtype)
    W[E // 2 :] = W[: E - E // 2]  # duplicated router rows: exactly tied logits
    d = metal_device
    w, ids = metal.moe_gate_route(x.to(d), W.to(d), k, normalize)
    rw, rids = ops.moe_gate_route(x, W, k, normalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    if wdtype == dtype:  # the existing two-op path: logits in the activation dtype, then moe_route
        lw, lids = lowest_index_route(F.linear(x.float(), W.float()).to(dtype), k, normalize)
        assert torch.equal(ids.cpu(), lids)
        torch.testing.assert_close(w.cpu(), lw, rtol=1e-5, atol=1e-6)


def test_metal_moe_gate_route_no_expert_rows(metal_device):
    # Half logits: 1000-scale rows overflow to +-inf after rounding, as x @ W.T in float16 does.
    E, H = 8, 32
    W = torch.randn(E, H, generator=gen(80)) / 8
    W[:, 0] = W[:, 0].abs() + 0.1
    W[4:, 1] = -50.0  # experts 4.. get -inf logits in row 3 only: a valid row with zero probabilities
    x = torch.randn(5, H, generator=gen(81))
    x[0, 3], x[1, 0], x[2, 0] = math.nan, math.inf, -math.inf
    x[3, 1] = 2000.0
    x, W = x.half(), W.half()
    d = metal_device
    w, ids = metal.moe_gate_route(x.to(d), W.to(d), 6, True)
    rw, rids = ops.moe_gate_route(x, W, 6, True)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    assert (ids[:3].cpu() == -1).all() and (w[:3].cpu() == 0).all()
    assert (ids[3, :4].cpu().sort().values == torch.arange(4, dtype=torch.int32)).all()  # the 4 finite experts first
    assert (ids[3, 4:].cpu() == torch.tensor([4, 5], dtype=torch.int32)).all() and (w[3, 4:].cpu() == 0).all()


def test_metal_bad_input(metal_device):
    d = metal_device
    with pytest.raises(ValueError, match="256 experts"):
        metal.moe_gate_route(torch.randn(2, 8, device=d), torch.randn(257, 8, device=d), 2, True)
    with pytest.raises(TypeError, match="activation dtype"):
        metal.rms_norm(torch.randn(2, 8, device=d), torch.ones(8, dtype=torch.float16, device=d), 1e-6)
