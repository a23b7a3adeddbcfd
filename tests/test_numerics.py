"""Half-precision activations (MPS defaults to float16) stay finite and close to float32.

Reference: transformers' own float32 model loaded from the same synthetic GGUF. Measured on this
file (48 tokens, 3 seeds): float16 agrees on every top-1 token, max |dlogit| 0.004, mean 7e-4;
bfloat16 agrees on 94-96% (its 8-bit router logits flip near-tied experts), mean |dlogit| 0.01-0.014.
The long-sequence study on the real Gemma file is benchmarks/bench_numerics.py.
"""

import pytest
import torch

from ferrum_mps import load_model
from ferrum_mps.testing.synthetic import synthetic_gguf


@pytest.fixture(scope="module")
def synth():
    return synthetic_gguf("qwen3moe")  # 2 layers, 8 experts top-2, the mixed Q4_K/Q6_K/Q8_0 file


@pytest.fixture(scope="module")
def reference(synth):
    ids = torch.randint(0, 1024, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, synth.hf_model(dtype=torch.float32)(ids).logits[0].double()


# dtype: (min top-1 agreement, max mean |dlogit|, max max |dlogit|) - about 5x the measured drift
BOUNDS = {torch.float32: (1.0, 1e-5, 1e-4), torch.float16: (0.95, 5e-3, 0.05), torch.bfloat16: (0.85, 0.05, 3.0)}


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
def test_half_activations_track_float32(synth, reference, dtype):
    ids, ref = reference
    model = load_model(synth.path, device="cpu", dtype=dtype, progress=False)
    with torch.no_grad():
        out = model(ids).logits[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    got = out.double()
    d = (got - ref).abs()
    top1 = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    agree, mean_bound, max_bound = BOUNDS[dtype]
    assert top1 >= agree, (top1, d.mean().item())
    assert d.mean(-1).mean().item() <= mean_bound and d.max().item() <= max_bound, (d.mean().item(), d.max().item())


def _residual_max(model):
    """Forward hooks recording the largest |value| of the residual stream after each decoder block
    (a block returns the stream and (its own output still to add, the sandwich norm to apply to it
    first or None): their sum, taken in float32)."""
    seen = []

    def hook(module, args, out):
        x, pending = out if isinstance(out, tuple) else (out, None)
        if pending is not None:
            h, pre = pending
            pending = h if pre is None else pre(h)
        s = x.float() if pending is None else x.float() + pending.float()
        seen.append(s.abs().max().item())

    for layer in model.layers:
        layer.register_forward_hook(hook)
    return seen


def test_gemma_residual_overflows_float16_not_bfloat16(gemma_gguf_path):
    """Why MPS defaults to bfloat16: the real Gemma-3-270M's residual stream passes float16's 65504
    (1.04e5 at layer 14, from the BOS position), so float16 activations turn the logits non-finite."""
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 236764, 107]])  # <bos> and a few ordinary tokens
    logits, peak = {}, {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = load_model(gemma_gguf_path, device="cpu", dtype=dtype, progress=False)
        seen = _residual_max(model)
        with torch.no_grad():
            logits[dtype] = model(ids).logits[0].float()
        peak[dtype] = max(seen)
    assert peak[torch.float32] > torch.finfo(torch.float16).max  # the stream itself exceeds float16
    assert not torch.isfinite(logits[torch.float16]).all()
    assert torch.isfinite(logits[torch.bfloat16]).all() and peak[torch.bfloat16] < float("inf")
    agree = (logits[torch.bfloat16].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree


def test_default_dtype(monkeypatch):
    from ferrum_mps.loading import default_dtype

    assert default_dtype(torch.device("cpu")) == torch.float32
    for macos14, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor, v=macos14: v if major >= 14 else True)
        assert default_dtype(torch.device("mps")) == want
