"""The MPS implementations of the MoE ops (metal_ops/moe.metal + launch code) against the CPU ops.

Runs under the Metal-on-CPU harness (and on a Mac's GPU too) through the `metal_device` fixture.
The CPU ops are themselves checked against gguf-py and transformers in test_ops_moe.py.
"""

import contextlib

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_ops_moe import mix_stacks, rand_ids, rand_stack

import ferrum_mps.metal as metal
import ferrum_mps.ops.moe as moe_ops
from ferrum_mps import shaders

ops = torch.ops.ferrum


def close(got, ref, tol):
    got, ref = got.detach().cpu().double(), ref.double()
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0
    assert err < tol, err


# ------------------------------------------------------------------------- routing


def lowest_index_topk(logits, k, normalize):
    """Top-k with exact ties going to the lower expert index (a stable descending sort)."""
    probs = torch.softmax(logits.float(), -1)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    w = probs.gather(1, ids)
    return (w / w.sum(-1, keepdim=True) if normalize else w), ids.to(torch.int32)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 8), (128, 2), (128, 8), (256, 8), (40, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_route(metal_device, E, k, normalize):
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(E + k))
    w, ids = metal.moe_route(logits.to(metal_device), k, normalize)
    rw, rids = ops.moe_route(logits, k, normalize)  # torch.topk, as transformers
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 3), (128, 8), (256, 8)])
def test_route_exact_ties_lowest_index_first(metal_device, E, k):
    # torch.topk's order among exactly equal values is unspecified on CPU (it returns expert 6 of
    # 8 equal ones for k = 1): the kernel's rule is the lower expert index.
    logits = torch.randn(4, E, generator=torch.Generator().manual_seed(E))
    logits[0] = 0.5
    logits[1, E // 2 :] = logits[1, : E - E // 2]
    logits[2] = torch.randint(0, 3, (E,), generator=torch.Generator().manual_seed(k)).float()
    w, ids = metal.moe_route(logits.to(metal_device), k, True)
    rw, rids = lowest_index_topk(logits, k, True)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    # Same selected weights as the CPU op whatever its tie order.
    torch.testing.assert_close(w.cpu(), ops.moe_route(logits, k, True)[0], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_half(metal_device, dtype):
    # Half-precision logits tie often (bf16 keeps 8 bits): ties go to the lower index.
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    w, ids = metal.moe_route(logits.to(metal_device), 8, True)
    rw, rids = lowest_index_topk(logits, 8, True)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(w.cpu(), ops.moe_route(logits, 8, True)[0], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_nan_and_infinite_rows_select_no_expert(metal_device, normalize):
    """A token whose softmax is undefined (a NaN or +inf logit, or every logit -inf) gets id -1 and
    weight 0 in every slot ("no expert"), on the CPU and from the Metal kernel alike; other rows
    route as usual (a -inf logit is just an expert nobody picks)."""
    E, k = 40, 3
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(1))
    logits[1, 7] = float("nan")
    logits[2] = float("-inf")
    logits[3, 0] = float("inf")
    logits[4, 5:] = float("-inf")  # fine: experts 0-4 are left
    bad = torch.tensor([False, True, True, True, False, False])
    for w, ids in (ops.moe_route(logits, k, normalize), metal.moe_route(logits.to(metal_device), k, normalize)):
        w, ids = w.cpu(), ids.cpu()
        assert torch.equal(ids[bad], torch.full((3, k), -1, dtype=torch.int32))
        assert torch.equal(w[bad], torch.zeros(3, k))
        rw, rids = lowest_index_topk(logits[~bad], k, normalize)
        assert torch.equal(ids[~bad], rids)
        torch.testing.assert_close(w[~bad], rw, rtol=2e-6, atol=1e-7)


def test_route_bad_input(metal_device):
    with pytest.raises(ValueError, match="256 experts"):
        metal.moe_route(torch.randn(2, 257, device=metal_device), 2, True)
    with pytest.raises(ValueError, match="top_k"):
        metal.moe_route(torch.randn(2, 8, device=metal_device), 9, True)


# ------------------------------------------------------------------------- moe_qlinear


@pytest.mark.parametrize(
    "qtype,out,inp", [(Q.Q4_K, 70, 256), (Q.Q6_K, 36, 256), (Q.Q5_K, 20, 256), (Q.Q8_0, 66, 64), (Q.Q4_0, 8, 96), (Q.Q5_0, 12, 32)]
)
@pytest.mark.parametrize("T,k", [(1, 2), (5, 3), (33, 2)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_qlinear(metal_device, qtype, out, inp, T, k, per_slot):
    E = 8
    raw = rand_stack(E, out, inp, qtype, seed=out)
    ids = rand_ids(T, k, E, seed=T)
    x = torch.randn((T, k, inp) if per_slot else (T, inp), generator=torch.Generator().manual_seed(T))
    y = metal.moe_qlinear(x.to(metal_device), ids.to(metal_device), raw.to(metal_device), int(qtype), out, inp)
    assert y.shape == (T, k, out) and y.dtype == torch.float32
    close(y, ops.moe_qlinear(x, ids, raw, int(qtype), out, inp), 2e-6)


@pytest.mark.parametrize("T", [3, 40])
def test_qlinear_skips_bad_ids_and_takes_int64(metal_device, T):
    raw, ids = rand_stack(4, 8, 32, Q.Q8_0), rand_ids(T, 2, 4).long()
    x = torch.randn(T, 32)
    bad = ids.clone()
    bad[0, 1], bad[-1, 0] = 4, -1  # out of range: never used as an address, rows of zeros
    y = metal.moe_qlinear(x.to(metal_device), bad.to(metal_device), raw.to(metal_device), int(Q.Q8_0), 8, 32).cpu()
    ref = ops.moe_qlinear(x, ids, raw, int(Q.Q8_0), 8, 32)
    ref[0, 1] = 0
    ref[-1, 0] = 0
    close(y, ref, 2e-6)
    assert not y[0, 1].any() and not y[-1, 0].any()


@pytest.mark.parametrize("T", [3, 40])
def test_int64_ids_outside_int32_are_no_expert_not_truncated(metal_device, stacks, T):
    """2**32 + 1 must not become expert 1 when the launcher narrows ids to int32 (mv and mm paths);
    -1 is "no expert" on the CPU too, other out-of-range ids are rejected there (a free check)."""
    raws, qs, H, inter = stacks("q8_0", 8)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    w, ids = ops.moe_route(torch.randn(T, 8, generator=torch.Generator().manual_seed(5)), 2, True)
    bad, w0 = ids.long(), w.clone()
    bad[0, 0], bad[T - 1, 1], bad[1, 1] = 2**32 + 1, -(2**32) + 3, -1
    w0[0, 0] = w0[T - 1, 1] = w0[1, 1] = 0
    ref = ops.moe_ffn(x, w0, ids, *raws, *qs, inter)
    close(run_ffn(metal_device, x, w, bad, raws, qs, inter), ref, 2e-6)
    y = metal.moe_qlinear(x.to(metal_device), bad.to(metal_device), raws[0].to(metal_device), qs[0], inter, H).cpu()
    assert not y[0, 0].any() and not y[T - 1, 1].any() and not y[1, 1].any()
    close(y[2:T - 1], ops.moe_qlinear(x, ids, raws[0], qs[0], inter, H)[2:T - 1], 2e-6)
    none = ids.long()
    none[1, 1] = -1
    close(ops.moe_ffn(x, w0, none, *raws, *qs, inter), ref, 1e-6)
    with pytest.raises(ValueError, match="expert ids must be in"):
        ops.moe_ffn(x, w, bad, *raws, *qs, inter)


def test_qlinear_half_activations(metal_device):
    raw, ids = rand_stack(8, 16, 256, Q.Q4_K), rand_ids(3, 2, 8)
    x = torch.randn(3, 256).to(torch.float16)
    y = metal.moe_qlinear(x.to(metal_device), ids.to(metal_device), raw.to(metal_device), int(Q.Q4_K), 16, 256)
    assert y.dtype == torch.float16
    close(y, ops.moe_qlinear(x.float(), ids, raw, int(Q.Q4_K), 16, 256), 2e-3)


# ------------------------------------------------------------------------- moe_ffn


MIXES = {
    "q4k_q6k": ((Q.Q4_K, Q.Q4_K, Q.Q6_K), 256, 256),
    "q8_0": ((Q.Q8_0,) * 3, 64, 96),
    "q5k": ((Q.Q5_K,) * 3, 256, 256),
    "q4_0_gate_q8_0_up": ((Q.Q4_0, Q.Q8_0, Q.Q5_0), 64, 96),  # mixed gate/up: the fallback path
}


@pytest.fixture(scope="module")
def stacks():
    cache = {}

    def get(mix, E):
        if (mix, E) not in cache:
            raws, qs, H, inter = mix_stacks(MIXES[mix], E)
            cache[mix, E] = raws, tuple(map(int, qs)), H, inter
        return cache[mix, E]

    return get


def run_ffn(dev, x, w, ids, raws, qs, inter):
    return metal.moe_ffn(x.to(dev), w.to(dev), ids.to(dev), *(r.to(dev) for r in raws), *qs, inter)


# Both sides of the mat-vec / mat-mat threshold (32 tokens) for Q8_0; the K-quant mixes run fewer
# mat-mat cases (each emulated 64x32 tile costs ~0.1-0.3 s in the harness; test_qlinear covers
# the mat-mat path for every type).
FFN_CASES = (
    [("q8_0", T, k, E) for T, k, E in [(1, 8, 8), (2, 2, 8), (7, 1, 8), (31, 2, 8), (32, 2, 8), (33, 8, 8), (40, 1, 128)]]
    + [("q4k_q6k", T, k, E) for T, k, E in [(1, 8, 128), (7, 1, 8), (33, 1, 8)]]
    + [("q5k", T, k, E) for T, k, E in [(2, 2, 8), (32, 1, 8)]]
    + [("q4_0_gate_q8_0_up", T, k, E) for T, k, E in [(3, 2, 8), (33, 2, 8)]]
)


@pytest.mark.parametrize("mix,T,k,E", FFN_CASES)
def test_ffn(metal_device, stacks, mix, T, k, E):
    raws, qs, H, inter = stacks(mix, E)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    w, ids = ops.moe_route(torch.randn(T, E, generator=torch.Generator().manual_seed(k)), k, True)
    y = run_ffn(metal_device, x, w, ids, raws, qs, inter)
    assert y.shape == (T, H) and y.dtype == torch.float32
    close(y, ops.moe_ffn(x, w, ids, *raws, *qs, inter), 2e-6)


@pytest.mark.parametrize("T", [3, 34])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ffn_half(metal_device, stacks, T, dtype):
    raws, qs, H, inter = stacks("q8_0", 8)
    x = torch.randn(T, H).to(dtype)
    w, ids = ops.moe_route(torch.randn(T, 8), 2, True)
    y = run_ffn(metal_device, x, w, ids, raws, qs, inter)
    assert y.dtype == dtype
    close(y, ops.moe_ffn(x.float(), w, ids, *raws, *qs, inter), 1e-2)


@pytest.mark.parametrize("T", [3, 40])
def test_ffn_skips_bad_ids_and_handles_repeats(metal_device, stacks, T):
    raws, qs, H, inter = stacks("q8_0", 8)
    x = torch.randn(T, H)
    w, ids = ops.moe_route(torch.randn(T, 8), 2, True)
    ids[1, 1] = ids[1, 0]  # a token picking one expert twice is just two pairs
    bad, w0 = ids.clone(), w.clone()
    bad[0, 0], bad[T - 1, 1] = 8, -5
    w0[0, 0] = w0[T - 1, 1] = 0  # the reference: those pairs weigh nothing
    y = run_ffn(metal_device, x, w, bad, raws, qs, inter)
    close(y, ops.moe_ffn(x, w0, ids, *raws, *qs, inter), 2e-6)


def test_ffn_bad_input(metal_device, stacks):
    raws, qs, H, inter = stacks("q8_0", 8)
    x, (w, ids) = torch.randn(3, H), ops.moe_route(torch.randn(3, 8), 2, True)
    q2 = rand_stack(8, inter, 256, Q.Q2_K)
    with pytest.raises(ValueError, match="Q2_K has no Metal MoE kernel"):
        metal.moe_ffn(torch.randn(3, 256, device=metal_device), w.to(metal_device), ids.to(metal_device),
                      q2.to(metal_device), q2.to(metal_device), rand_stack(8, 256, inter, Q.Q8_0).to(metal_device),
                      int(Q.Q2_K), int(Q.Q2_K), 8, inter)
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        run_ffn(metal_device, x, w[:, :1], ids, raws, qs, inter)
    with pytest.raises(ValueError, match="down_raw must be an expert stack"):
        run_ffn(metal_device, x, w, ids, (raws[0], raws[1], raws[2][:, 1:]), qs, inter)


# ------------------------------------------------------------------------- launch counts


class CountingCompiler:
    """Wraps the current compiler: every kernel launch is recorded by name."""

    def __init__(self, inner):
        self.inner, self.launches = inner, []

    def __call__(self, source):
        lib, launches = self.inner(source), self.launches

        class Lib:
            def __getattr__(self, name):
                k = getattr(lib, name)

                def launch(*args, **kwargs):
                    launches.append(name)
                    return k(*args, **kwargs)

                return launch

        return Lib()


@contextlib.contextmanager
def counting():
    counter = CountingCompiler(shaders.get_shader_compiler())
    with metal.use_shader_compiler(counter):
        yield counter.launches


@pytest.mark.parametrize("T", [1, 31, 32, 512])
def test_launch_counts(metal_device, T):
    E, k, H, inter = 8, 2, 32, 32
    raws = tuple(rand_stack(E, o, i, Q.Q8_0, s).to(metal_device) for s, (o, i) in enumerate(((inter, H), (inter, H), (H, inter))))
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    with counting() as launches:
        w, ids = metal.moe_route(logits.to(metal_device), k, True)
        n_route = len(launches)
        y = metal.moe_ffn(x.to(metal_device), w, ids, *raws, 8, 8, 8, inter)
    ffn = launches[n_route:]
    assert n_route == 1
    if T < moe_ops._MM_MIN_TOKENS:
        assert ffn == ["moe_mv_gate_up_q8_0_f32", "moe_mv_down_sum_q8_0_f32"]
    else:
        assert ffn == ["moe_bucket", "moe_mm_gate_up_q8_0_f32", "moe_mm_down_q8_0", "moe_reduce_f32"]
    rw, rids = ops.moe_route(logits, k, True)
    assert torch.equal(ids.cpu(), rids)
    close(y, ops.moe_ffn(x, rw, rids, *(r.cpu() for r in raws), 8, 8, 8, inter), 2e-6)
