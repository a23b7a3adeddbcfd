"""The CPU decode plan (models/native_plan.py): one native call per token.

The plan runs the same kernels as the native ops, so a greedy generate() must give the same tokens
and the same logits, bit for bit, with the plan as without it; the float helpers it shares with the
ops (rms_norm, activations, attention, MoE routing and combine) are checked against torch here, and
the native ops against gguf-py / transformers in test_native.py and the model tests.
"""

import pytest
import torch
import torch.nn.functional as F

import ferrum_mps.ops  # noqa: F401
from ferrum_mps import load_model, native
from ferrum_mps.models import native_plan
from ferrum_mps.testing.synthetic import synthetic_gguf

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def gemma(gemma_gguf_path):
    return load_model(gemma_gguf_path, device="cpu", progress=False)


@pytest.fixture
def plan_runs(monkeypatch):
    """How many tokens went through a plan."""
    runs = []
    real = native.Plan.run
    monkeypatch.setattr(native.Plan, "run", lambda self, *a: runs.append(a) or real(self, *a))
    return runs


def _generate(model, ids, n, plan: bool, **kw):
    model.native_decode = plan
    try:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    finally:
        model.native_decode = True
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("window", [None, 3], ids=["file-window", "window-3"])
def test_gemma_plan_equals_the_op_path_bit_for_bit(gemma, plan_runs, window):
    """Real Gemma-3-270M (sandwich norms, qk-norm, two ropes, sliding-window layers): a window of 3
    makes the sliding layers drop slots during the test (the file's 512 never does here)."""
    c = gemma.config
    before = c.swa_window
    if window is not None:
        c.swa_window = window
    try:
        ids = torch.tensor([[2, 818, 5279, 529, 496, 990, 236764]])
        want_seq, want = _generate(gemma, ids, 10, plan=False)
        assert not plan_runs
        got_seq, got = _generate(gemma, ids, 10, plan=True)
    finally:
        c.swa_window = before
    assert len(plan_runs) == 9  # every token after the prefill's
    assert torch.equal(got_seq, want_seq)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen3", "qwen2", "llama"])
def test_synthetic_plan_equals_ops_and_tracks_the_float_reference(arch, plan_runs):
    """MoE routing and experts (qwen3moe), q/k/v biases (qwen2), QK-norm (qwen3), interleaved rope (llama)."""
    model = load_model(synthetic_gguf(arch).path, device="cpu", progress=False)
    ids = torch.randint(0, 1024, (1, 6), generator=torch.Generator().manual_seed(3))
    want_seq, want = _generate(model, ids, 6, plan=False)
    got_seq, got = _generate(model, ids, 6, plan=True)
    assert len(plan_runs) == 5
    assert torch.equal(got_seq, want_seq) and torch.equal(got, want)
    # The independent reference: the exact float path (gguf-py-checked dequantization) on the same tokens.
    with native.disabled(), torch.no_grad():
        ref = model(got_seq[:, :-1]).logits[0, ids.shape[1] - 1 :]
    rel = ((got[:, 0] - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 3e-2, rel  # measured 1.2e-2 to 1.4e-2 (int8 activations through 2 layers)


def test_plan_steps_aside_for_hooks_padding_and_new_weights(gemma, plan_runs):
    ids = torch.tensor([[2, 818, 5279, 529, 496]])
    calls = []
    h = gemma.layers[3].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        _generate(gemma, ids, 3, plan=True)
    finally:
        h.remove()
    assert not plan_runs and len(calls) == 3  # the hook ran on every token: the op path served them
    # Left padding hides slots the token attends: the op path, same tokens as without the plan.
    padded = torch.cat([torch.zeros_like(ids[:, :2]), ids], 1)
    mask = torch.cat([torch.zeros_like(ids[:, :2]), torch.ones_like(ids)], 1)
    a, _ = _generate(gemma, padded, 3, plan=True, attention_mask=mask)
    assert not plan_runs
    b, _ = _generate(gemma, padded, 3, plan=False, attention_mask=mask)
    assert torch.equal(a, b)
    # New weights under a live plan (a reassigned projection: zeros, so a stale plan would show): the
    # next token rebuilds the plan from them.
    lin = gemma.layers[0].self_attn.o_proj
    old = lin.raw
    with torch.inference_mode():
        cache = gemma.static_cache(1, 16)
        gemma(ids, past_key_values=cache)
        gemma(ids[:, :1], past_key_values=cache)  # slot 5: builds the plan
        first = native_plan.latest(gemma)
        lin.raw = torch.zeros_like(old)
        try:
            at6 = dict(past_key_values=cache, cache_position=torch.tensor([6]))
            got = gemma(ids[:, 1:2], **at6).logits
            rebuilt = native_plan.latest(gemma)
            gemma.native_decode = False
            want = gemma(ids[:, 1:2], **at6).logits
        finally:
            lin.raw, gemma.native_decode = old, True
    assert first is not None and rebuilt not in (None, first)
    assert torch.equal(got, want)
    # any _apply (.to, .float) may move or recast what a plan points to: the next token builds a new one
    cache = gemma.static_cache(1, 16)
    with torch.inference_mode():
        gemma(ids, past_key_values=cache)
        gemma(ids[:, :1], past_key_values=cache)
        before = native_plan.latest(gemma)
        gemma.to(torch.float32)
        gemma(ids[:, :1], past_key_values=cache)
    assert before is not None and native_plan.latest(gemma) is not before
    del cache
    import gc

    gc.collect()
    assert native_plan.latest(gemma) is None  # the plan went with its cache (and stopped holding its tensors)


# ---------------------------------------------------------------------------- the shared float helpers vs torch


def test_rms_norm_and_activations_vs_torch():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 640, generator=g) * 30, torch.randn(640, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)
    a, b = torch.randn(5000, generator=g) * 8, torch.randn(5000, generator=g)
    a[:6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-3, -200.0])  # saturated ends and tiny values
    torch.testing.assert_close(native.act_mul("silu", a, b), F.silu(a) * b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native.act_mul("gelu_pytorch_tanh", a, b), F.gelu(a, approximate="tanh") * b,
                               rtol=1e-5, atol=1e-6)
    assert native.act_mul("relu", a, b) is None  # not a native activation: the caller's torch code runs
    # Prefill-sized calls split rows (chunks of elements) over the pool: the split changes no bit.
    big, gb, ub = torch.randn(96, 2048, generator=g), torch.randn(300_001, generator=g), torch.randn(300_001, generator=g)
    wb = torch.randn(2048, generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((native.rms_norm(big, wb, 1e-6), native.act_mul("gelu_pytorch_tanh", gb, ub),
                         native.add_rms_norm(big, big.flip(0), wb, 1e-6, wb)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(p, q) for p, q in zip(outs[0][2], outs[1][2]))


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 37), (29, 37)])
def test_decode_attention_vs_sdpa(lo, hi):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, S, D = 2, 8, 2, 40, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    kc, vc = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    got = native.decode_attention(q, kc, vc, lo, hi, 0.125)
    k, v = (t[:, :, lo:hi].repeat_interleave(Hq // Hkv, 1) for t in (kc, vc))
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.125).reshape(B, 1, Hq * D)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_moe_route_vs_torch_with_ties_and_nan():
    g = torch.Generator().manual_seed(2)
    E, H, k = 16, 64, 4
    router = torch.randn(E, H, generator=g)
    router[5] = router[2]  # experts 2 and 5 always tie: the lower index goes first
    x = torch.randn(6, H, generator=g)
    x[3, 7] = float("nan")
    x[4] = -router[2] * 50  # 2 and 5 at the very bottom; the top-k is elsewhere
    x[5] = router[2] * 50  # 2 and 5 on top: 2 first
    for normalize in (True, False):
        w, ids = native.moe_route(x, router, k, normalize)
        with native.disabled():
            rw, rids = torch.ops.ferrum.moe_gate_route(x, router, k, normalize)
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    assert ids[3].tolist() == [-1] * k and w[3].tolist() == [0.0] * k
    assert ids[5, :2].tolist() == [2, 5]
