"""ferrum::decode_attention (CPU op and the Metal kernels under the harness) against an independent
reference: torch's scaled_dot_product_attention in float64 on K/V repeated by transformers' repeat_kv,
with the mask built explicitly from models/modeling.py's `_masks` rules (causal, window, padding, self always)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

import ferrum_mps.metal as metal
import ferrum_mps.ops  # noqa: F401
from ferrum_mps import shaders
from ferrum_mps.ops import attention as A
from test_metal_linear import _CountingCompiler

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(q, k, v, pos, mask, window, scale):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = torch.arange(S)
    allowed = s[None] <= pos[:, None]
    if window:
        allowed = allowed & (pos[:, None] - s[None] < window)
    allowed = allowed[None].expand(B, T, S)
    if mask is not None:  # transformers' expansion of a 2-D mask: columns past its end are kept
        m = torch.ones(B, S, dtype=torch.bool)
        m[:, : min(S, mask.shape[1])] = mask[:, :S].bool()
        allowed = allowed & m[:, None]
    allowed = allowed | (s[None] == pos[:, None])[None]
    kk, vv = repeat_kv(k.double(), Hq // Hkv), repeat_kv(v.double(), Hq // Hkv)
    o = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=allowed[:, None], scale=scale)
    return o.transpose(1, 2).reshape(B, T, Hq * D)


def make(B, Hq, Hkv, T, D, S, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def left_padding(B, S, pads):
    m = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate(pads):
        m[b, :n] = 0
    return m


def check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# (B, Hq, Hkv, T, D, S, positions, pads, window): decode, GQA, left padding, sliding window, T > 1
CASES = {
    "decode_gqa4": (1, 4, 1, 1, 64, 40, [33], None, 0),
    "decode_pad": (2, 4, 2, 1, 128, 30, [29], [0, 7], 0),
    "window": (1, 2, 1, 1, 64, 50, [45], None, 16),
    "prefill_pad_window": (2, 6, 3, 5, 64, 24, [3, 4, 5, 6, 7], [0, 5], 4),
    "pad_query_sees_itself": (2, 2, 1, 3, 64, 12, [0, 1, 2], [0, 3], 0),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_matches_sdpa(case):
    B, Hq, Hkv, T, D, S, p, pads, window = CASES[case]
    q, k, v = make(B, Hq, Hkv, T, D, S)
    pos, mask = torch.tensor(p), left_padding(B, S, pads) if pads else None
    y = torch.ops.ferrum.decode_attention(q, k, v, pos, mask, window, D**-0.5)
    ref = reference(q, k, v, pos, mask, window, D**-0.5)
    assert torch.isfinite(y).all()
    check(y, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_decode_fast_path_matches_sdpa(dtype):
    # T == 1 with an all-ones mask (what generate() passes) takes a slice of the cache and one
    # SDPA call; a zero inside the window or a mask shorter than the cache must behave as the
    # general path (the reference above).
    B, Hq, Hkv, D, S = 2, 4, 2, 64, 40
    q, k, v = make(B, Hq, Hkv, 1, D, S, dtype)
    for p, mask, window in (([30], torch.ones(B, S, dtype=torch.long), 8), ([30], torch.ones(B, 20, dtype=torch.bool), 0),
                            ([30], left_padding(B, S, [0, 25]), 8), ([5], None, 0), ([39], None, 100)):
        pos = torch.tensor(p)
        y = torch.ops.ferrum.decode_attention(q, k, v, pos, mask, window, D**-0.5)
        check(y, reference(q, k, v, pos, mask, window, D**-0.5), dtype)
    torch.library.opcheck(torch.ops.ferrum.decode_attention, (q, k, v, torch.tensor([12]), torch.ones(B, 13, dtype=torch.long), 4, 0.125))


def test_cpu_opcheck():
    q, k, v = make(2, 4, 2, 2, 64, 20)
    mask = left_padding(2, 20, [0, 3])
    torch.library.opcheck(torch.ops.ferrum.decode_attention, (q, k, v, torch.tensor([10, 11]), mask, 0, 0.125))
    torch.library.opcheck(torch.ops.ferrum.decode_attention, (q.half(), k.half(), v.half(), torch.tensor([4, 5]), None, 3, 0.125))


def test_cpu_raises_on_positions_outside_cache():
    q, k, v = make(1, 2, 1, 1, 64, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        torch.ops.ferrum.decode_attention(q, k, v, torch.tensor([8]), None, 0, 0.125)


# ---------------------------------------------------------------------------------------------
# Metal kernels under the harness


@pytest.mark.parametrize("case", CASES, ids=str)
def test_metal_matches_sdpa(metal_device, case):
    B, Hq, Hkv, T, D, S, p, pads, window = CASES[case]
    q, k, v = make(B, Hq, Hkv, T, D, S, seed=1)
    pos, mask = torch.tensor(p), left_padding(B, S, pads) if pads else None
    dev = metal_device
    y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), pos.to(dev), None if mask is None else mask.to(dev), window, D**-0.5)
    check(y, reference(q, k, v, pos, mask, window, D**-0.5), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [128, 256])
def test_metal_low_precision_and_head_dims(metal_device, dtype, D):
    q, k, v = make(1, 4, 2, 1, D, 20, dtype=dtype, seed=D)
    pos, mask = torch.tensor([17]), left_padding(1, 24, [2]).bool()  # a wider mask than the cache
    dev = metal_device
    y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), pos.to(dev), mask.to(dev), 0, 0.0625)
    check(y, reference(q, k, v, pos, mask, 0, 0.0625), dtype)


@pytest.mark.parametrize("window", [0, 300])
def test_metal_split_sequence(metal_device, window):
    """Flash-decoding: 5 splits of >= 128 slots merged by the reduce kernel; GQA with G = 2, left padding."""
    B, Hq, Hkv, T, D, S = 2, 4, 2, 2, 64, 600
    q, k, v = make(B, Hq, Hkv, T, D, S, seed=3)
    pos, mask = torch.tensor([559, 560]), left_padding(B, S, [0, 150])
    assert A.attention_plan(B, T, Hq, Hkv, S)[2] == 5
    counting = _CountingCompiler(shaders.get_shader_compiler())
    dev = metal_device
    with metal.use_shader_compiler(counting):
        y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), pos.to(dev), mask.to(dev), window, D**-0.5)
    assert counting.launches == ["attn_split_f32", "attn_reduce_f32"]
    check(y, reference(q, k, v, pos, mask, window, D**-0.5), torch.float32)


def test_mask_shorter_than_the_cache(metal_device):
    """generate() with a static cache: the 2-D mask covers the tokens so far, the cache is longer."""
    q, k, v = make(2, 4, 2, 1, 64, 48, seed=6)
    pos, mask = torch.tensor([20]), left_padding(2, 21, [0, 4])
    ref = reference(q, k, v, pos, mask, 0, 0.125)
    padded = torch.cat((mask, torch.zeros(2, 27, dtype=torch.long)), 1)  # slots past p never matter
    check(torch.ops.ferrum.decode_attention(q, k, v, pos, mask, 0, 0.125), ref, torch.float32)
    check(torch.ops.ferrum.decode_attention(q, k, v, pos, padded, 0, 0.125), ref, torch.float32)
    dev = metal_device
    y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), pos.to(dev), mask[:, :15].to(dev), 0, 0.125)
    check(y, reference(q, k, v, pos, mask[:, :15], 0, 0.125), torch.float32)


def test_metal_one_launch_for_short_caches(metal_device):
    q, k, v = make(1, 2, 1, 1, 64, 64)
    counting = _CountingCompiler(shaders.get_shader_compiler())
    dev = metal_device
    with metal.use_shader_compiler(counting):
        y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), torch.tensor([40]).to(dev), None, 0, 0.125)
    assert counting.launches == ["attn_split_f32"]
    check(y, reference(q, k, v, torch.tensor([40]), None, 0, 0.125), torch.float32)


def test_metal_reads_only_the_visible_slots(metal_device):
    """NaN in the unused tail of the cache and before the window: a read of any of them would show."""
    B, Hq, Hkv, T, D, S = 1, 8, 2, 1, 64, 700
    q, k, v = make(B, Hq, Hkv, T, D, S, seed=4)
    p, window = 450, 200
    kn, vn = k.clone(), v.clone()
    for t in (kn, vn):
        t[:, :, p + 1 :] = float("nan")
        t[:, :, : p - window + 1] = float("nan")
    dev = metal_device
    pos = torch.tensor([p])
    y = metal.decode_attention(q.to(dev), kn.to(dev), vn.to(dev), pos.to(dev), None, window, 0.125)
    assert torch.isfinite(y.cpu()).all()
    check(y, reference(q, k, v, pos, None, window, 0.125), torch.float32)


def test_metal_many_query_heads_per_kv_head(metal_device):
    """G = 20 > 8 heads per threadgroup: the kv head's queries go to 3 threadgroups of 7 (the last has 6)."""
    q, k, v = make(1, 20, 1, 1, 64, 16, seed=5)
    assert A.attention_plan(1, 1, 20, 1, 16)[:2] == (7, 3)
    dev = metal_device
    y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), torch.tensor([15]).to(dev), None, 0, 0.125)
    check(y, reference(q, k, v, torch.tensor([15]), None, 0, 0.125), torch.float32)


def test_metal_matches_cpu_op_on_transposed_decode_query(metal_device):
    """The model's q is [B, T, Hq, D].transpose(1, 2): contiguous for T = 1, used without a copy."""
    qt = torch.randn(2, 1, 4, 64)
    _, k, v = make(2, 4, 2, 1, 64, 10)
    q = qt.transpose(1, 2)
    pos = torch.tensor([6])
    dev = metal_device
    y = metal.decode_attention(q.to(dev), k.to(dev), v.to(dev), pos.to(dev), None, 0, 0.125)
    torch.testing.assert_close(y.cpu(), torch.ops.ferrum.decode_attention(q, k, v, pos, None, 0, 0.125), rtol=1e-5, atol=1e-6)


def test_split_plan_scales_with_the_cache():
    """Threadgroups per call at 4K and 32K slots (Qwen3-30B-A3B: 32 query / 4 kv heads)."""
    assert A.attention_plan(1, 1, 32, 4, 4096) == (8, 1, 32)  # 32 splits of 128 slots
    assert A.attention_plan(1, 1, 32, 4, 32768) == (8, 1, 64)  # 64 splits of 512 slots
    assert A.attention_plan(1, 1, 4, 1, 128) == (4, 1, 1)  # short cache: one launch


def test_bad_input_raises(metal_device):
    q, k, v = make(1, 4, 2, 1, 64, 8)
    pos = torch.tensor([3])
    for fn in (torch.ops.ferrum.decode_attention, metal.decode_attention):
        with pytest.raises(ValueError, match="multiple of kv heads"):
            fn(q[:, :3], k, v, pos, None, 0, 0.1)
        with pytest.raises(TypeError, match="share a dtype"):
            fn(q, k.half(), v, pos, None, 0, 0.1)
        with pytest.raises(ValueError, match="cache_position"):
            fn(q, k, v, pos.int(), None, 0, 0.1)
        with pytest.raises(ValueError, match="attention_mask has shape"):
            fn(q, k, v, pos, torch.ones(2, 8, dtype=torch.long), 0, 0.1)
        with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
            fn(q, k, v, pos, torch.ones(1, 8), 0, 0.1)
        with pytest.raises(ValueError, match="head_dim"):
            fn(*make(1, 2, 1, 1, 320, 4), pos, None, 0, 0.1)
        with pytest.raises(ValueError, match="window"):
            fn(q, k, v, pos, None, -1, 0.1)


def test_registered_as_the_mps_implementation():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ferrum::decode_attention", "MPS")
    assert metal.decode_attention is A.decode_attention_mps
