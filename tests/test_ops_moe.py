"""CPU + fake implementations of ferrum::moe_route / moe_qlinear / moe_ffn.

References are independent of the code under test: gguf-py's numpy dequantizer, plain
per-pair torch loops, and transformers' Qwen3MoeTopKRouter for the routing math.
"""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

import ferrum_mps.ops  # noqa: F401
import ferrum_mps.ops.moe as moe_ops
from ferrum_mps import quants

ops = torch.ops.ferrum


def rand_stack(E, out, inp, qtype, seed=0):
    """A random expert stack [E, out, row_nbytes]: random bits everywhere, sane fp16 super-block scales."""
    g = torch.Generator().manual_seed(seed)
    qtype = Q(qtype)
    raw = torch.randint(0, 256, (E, out, quants.row_nbytes(qtype, inp)), dtype=torch.uint8, generator=g)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        dt = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
        return (torch.randn(E, out, inp, generator=g) * 0.1).to(dt).view(torch.uint8).reshape(raw.shape).contiguous()
    blocks = raw.view(-1, gguf.GGML_QUANT_SIZES[qtype][1])

    def f16(lo, hi):
        return (torch.rand(blocks.shape[0], generator=g) * (hi - lo) + lo).half().view(torch.uint8).view(-1, 2)

    scale, *mins = quants.FORMATS[qtype].f16_fields
    blocks[:, scale : scale + 2] = f16(0.002, 0.01)
    for at in mins:
        blocks[:, at : at + 2] = f16(0.0, 0.01)
    return raw


def deq(raw, qtype, inp):
    """Reference dequantization (gguf-py numpy): [E, out, inp] float32."""
    w = gguf.quants.dequantize(raw.numpy(), Q(qtype)).astype(np.float32)
    return torch.from_numpy(w).reshape(raw.shape[0], raw.shape[1], inp)


def ref_qlinear(x, ids, w):
    T, k = ids.shape
    rows = [[w[ids[t, s]].double() @ (x[t] if x.dim() == 2 else x[t, s]).double() for s in range(k)] for t in range(T)]
    return torch.stack([torch.stack(r) for r in rows]) if T else torch.zeros(0, k, w.shape[1], dtype=torch.float64)


def ref_ffn(x, weights, ids, g, u, d):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e, xt = ids[t, s], x[t].double()
            out[t] += weights[t, s].double() * (d[e].double() @ (F.silu(g[e].double() @ xt) * (u[e].double() @ xt)))
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def rand_ids(T, k, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32).reshape(T, k)


# ------------------------------------------------------------------------- moe_route


def hf_router(E, k, norm, H=32, seed=0):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm,
                         experts_implementation="eager")  # standalone block: transformers 5.0 has no default
    router = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(seed)))
    return router


def hf_route(router, x):
    """(logits, weights, ids) of transformers' router; the logits are computed here because
    transformers 5.0's router returns probabilities in that slot."""
    _, w, ids = router(x)
    return torch.nn.functional.linear(x, router.weight), w, ids


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (8, 8), (128, 1), (128, 2), (128, 8)])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_hf_router(E, k, norm):
    router = hf_router(E, k, norm)
    x = torch.randn(33, 32, generator=torch.Generator().manual_seed(1))
    logits, ref_w, ref_ids = hf_route(router, x)
    w, ids = ops.moe_route(logits, k, norm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (33, k)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)


def test_route_ties_follow_topk_order():
    # Duplicated router rows give exactly equal logits: torch.topk's order decides.
    router = hf_router(16, 4, True)
    with torch.no_grad():
        router.weight[8:] = router.weight[:8]
    logits, ref_w, ref_ids = hf_route(router, torch.randn(9, 32))
    logits = torch.cat([logits, torch.zeros(1, 16)])  # all sixteen equal
    w, ids = ops.moe_route(logits, 4, True)
    assert torch.equal(ids[:9].long(), ref_ids)
    assert ids[9].tolist() == torch.topk(torch.softmax(logits[9], -1), 4).indices.tolist()
    torch.testing.assert_close(w[9], torch.full((4,), 0.25))


def test_route_half_logits_softmax_in_float32():
    router = hf_router(8, 2, True).to(torch.bfloat16)
    logits, ref_w, ref_ids = hf_route(router, torch.randn(5, 32, dtype=torch.bfloat16))
    w, ids = ops.moe_route(logits, 2, True)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.to(ref_w.dtype), ref_w)  # HF casts to its logits' dtype (5.0: float32)


def test_route_bad_input():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(logits, 9, True)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(logits, 0, True)
    with pytest.raises(TypeError, match="router_logits"):
        ops.moe_route(logits.to(torch.int32), 2, True)
    with pytest.raises(ValueError, match="router_logits"):
        ops.moe_route(logits[0], 2, True)


# ------------------------------------------------------------------------- moe_qlinear


@pytest.mark.parametrize(
    "qtype,out,inp", [(Q.Q4_K, 40, 256), (Q.Q6_K, 24, 512), (Q.Q5_K, 16, 256), (Q.Q8_0, 24, 96), (Q.F16, 8, 48)]
)
@pytest.mark.parametrize("T,k,E", [(1, 1, 8), (7, 2, 8), (33, 8, 128)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_qlinear_matches_reference(qtype, out, inp, T, k, E, per_slot):
    raw = rand_stack(E, out, inp, qtype, seed=T)
    ids = rand_ids(T, k, E, seed=T)
    x = torch.randn((T, k, inp) if per_slot else (T, inp))
    y = ops.moe_qlinear(x, ids, raw, int(qtype), out, inp)
    assert y.shape == (T, k, out) and y.dtype == torch.float32
    assert rel_err(y, ref_qlinear(x, ids, deq(raw, qtype, inp))) < 1e-5


def test_qlinear_unbalanced_groups_int64_ids_and_chunks(monkeypatch):
    # One expert takes most pairs (per-expert matmul path), int64 ids, several dequant chunks.
    monkeypatch.setattr(moe_ops, "_CPU_CHUNK_BYTES", 2 * 32 * 256 * 4)
    E, T, k = 8, 40, 2
    raw = rand_stack(E, 32, 256, Q.Q4_K)
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T) % 7 + 1], 1)
    x = torch.randn(T, 256)
    y = ops.moe_qlinear(x, ids, raw, int(Q.Q4_K), 32, 256)
    assert rel_err(y, ref_qlinear(x, ids, deq(raw, Q.Q4_K, 256))) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qlinear_half_inputs(dtype):
    raw, ids = rand_stack(8, 16, 64, Q.Q8_0), rand_ids(5, 2, 8)
    x = torch.randn(5, 64).to(dtype)
    y = ops.moe_qlinear(x, ids, raw, int(Q.Q8_0), 16, 64)
    assert y.dtype == dtype
    ref = ref_qlinear(x.float(), ids, deq(raw, Q.Q8_0, 64))
    assert rel_err(y, ref) < 1e-2


def test_qlinear_empty_tokens():
    raw = rand_stack(4, 8, 32, Q.Q8_0)
    y = ops.moe_qlinear(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.int32), raw, int(Q.Q8_0), 8, 32)
    assert y.shape == (0, 2, 8)


# ------------------------------------------------------------------------- moe_ffn


MIXES = {
    "q4k_q6k": ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256),
    "q8_0": ((Q.Q8_0,) * 3, 64, 96),
    "q5k": ((Q.Q5_K,) * 3, 256, 256),
}


def mix_stacks(spec, E):
    """Random (gate, up, down) expert stacks for spec = ((gate, up, down qtypes), hidden, inter)."""
    (qg, qu, qd), H, inter = spec
    raws = (rand_stack(E, inter, H, qg, 1), rand_stack(E, inter, H, qu, 2), rand_stack(E, H, inter, qd, 3))
    return raws, (qg, qu, qd), H, inter


@pytest.fixture(scope="module")
def ffn_stacks():
    cache = {}

    def get(mix, E):
        if (mix, E) not in cache:
            raws, (qg, qu, qd), H, inter = mix_stacks(MIXES[mix], E)
            refs = (deq(raws[0], qg, H), deq(raws[1], qu, H), deq(raws[2], qd, inter))
            cache[mix, E] = (raws, refs, (qg, qu, qd), H, inter)
        return cache[mix, E]

    return get


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("T,k,E", [(1, 8, 128), (2, 2, 8), (7, 1, 8), (31, 8, 8), (32, 2, 128), (33, 8, 128), (100, 2, 8)])
def test_ffn_matches_reference(ffn_stacks, mix, T, k, E):
    (g, u, d), (rg, ru, rd), (qg, qu, qd), H, inter = ffn_stacks(mix, E)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    w, ids = ops.moe_route(torch.randn(T, E), k, True)
    y = ops.moe_ffn(x, w, ids, g, u, d, int(qg), int(qu), int(qd), inter)
    assert y.shape == (T, H) and y.dtype == torch.float32
    assert rel_err(y, ref_ffn(x, w, ids, rg, ru, rd)) < 1e-5


def test_ffn_bfloat16_and_empty(ffn_stacks):
    (g, u, d), (rg, ru, rd), qs, H, inter = ffn_stacks("q8_0", 8)
    x = torch.randn(6, H).to(torch.bfloat16)
    w, ids = ops.moe_route(torch.randn(6, 8), 2, False)
    y = ops.moe_ffn(x, w, ids, g, u, d, *map(int, qs), inter)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref_ffn(x.float(), w, ids, rg, ru, rd)) < 1e-2
    e = ops.moe_ffn(x[:0], w[:0], ids[:0], g, u, d, *map(int, qs), inter)
    assert e.shape == (0, H)


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    g, u, d = rand_stack(4, 96, 64, Q.Q8_0), rand_stack(4, 96, 64, Q.Q8_0), rand_stack(4, 64, 96, Q.Q8_0)
    # Seeded: `ids - 3` below must hold an id < -1 (-1 alone is a valid "no expert").
    w, ids = ops.moe_route(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), 2, True)
    return torch.randn(3, 64), w, ids, g, u, d


def ffn(x, w, ids, g, u, d, qtypes=(8, 8, 8), inter=96):
    return ops.moe_ffn(x, w, ids, g, u, d, *qtypes, inter)


def test_ffn_bad_input(small):
    x, w, ids, g, u, d = small
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        ffn(x, w, ids + 2, g, u, d)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        ffn(x, w, ids - 3, g, u, d)
    with pytest.raises(ValueError, match="ids must have shape"):
        ffn(x, w[:2], ids[:2], g, u, d)
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        ffn(x, w[:, :1], ids, g, u, d)
    with pytest.raises(ValueError, match="up_raw must be an expert stack"):
        ffn(x, w, ids, g, u[:, :, :-1], d)
    with pytest.raises(ValueError, match="down_raw has 3 experts"):
        ffn(x, w, ids, g, u, d[:3])
    with pytest.raises(ValueError, match="gate_raw must be an expert stack"):
        ffn(x, w, ids, g, u, d, qtypes=(int(Q.Q5_0), 8, 8))
    with pytest.raises(ValueError, match="multiple"):
        ffn(x, w, ids, g, u, d, qtypes=(int(Q.Q4_K), 8, 8))
    with pytest.raises(ValueError):
        ffn(x, w, ids, g, u, d, qtypes=(999, 8, 8))
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        ffn(x, w, ids.float(), g, u, d)
    with pytest.raises(TypeError, match="torch.uint8"):
        ffn(x, w, ids, g.to(torch.int8), u, d)
    with pytest.raises(TypeError, match="x must be float32"):
        ffn(x.to(torch.int32), w, ids, g, u, d)
    with pytest.raises(ValueError, match="contiguous"):
        ffn(x, w, ids, g.transpose(0, 1).contiguous().transpose(0, 1), u, d)
    with pytest.raises(ValueError, match="same device"):
        ffn(x.to("meta"), w, ids, g, u, d)


def test_qlinear_bad_input(small):
    x, w, ids, g, u, d = small
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        ops.moe_qlinear(x, ids * 4, g, 8, 96, 64)
    with pytest.raises(ValueError, match="ids must have shape"):
        ops.moe_qlinear(torch.randn(3, 3, 64), ids, g, 8, 96, 64)
    with pytest.raises(ValueError, match="ids must have shape"):
        ops.moe_qlinear(x, ids[:1], g, 8, 96, 64)
    with pytest.raises(ValueError, match="in_features"):
        ops.moe_qlinear(x, ids, g, 8, 96, 32)
    with pytest.raises(ValueError, match="experts_raw must be an expert stack"):
        ops.moe_qlinear(x, ids, g, 8, 64, 64)
    with pytest.raises(ValueError, match="same device"):
        ops.moe_qlinear(x, ids.to("meta"), g, 8, 96, 64)


# ------------------------------------------------------------------------- opcheck


def test_opcheck_all_ops(small):
    x, w, ids, g, u, d = small
    torch.library.opcheck(ops.moe_route.default, (torch.randn(5, 8), 3, True))
    torch.library.opcheck(ops.moe_route.default, (torch.randn(5, 8, dtype=torch.bfloat16), 8, False))
    torch.library.opcheck(ops.moe_qlinear.default, (x, ids, g, 8, 96, 64))
    torch.library.opcheck(ops.moe_qlinear.default, (torch.randn(3, 2, 96), ids, d, 8, 64, 96))
    torch.library.opcheck(ops.moe_ffn.default, (x, w, ids, g, u, d, 8, 8, 8, 96))
