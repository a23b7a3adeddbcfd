"""The native CPU kernels against llama.cpp's own logits on the same GGUF files (llama-cpp-python,
which `.ci/run` installs; benchmarks/bench_vs_llama_logits.py prints the same figures).

Both quantize activations to int8 (the same scheme), so neither equals the exact float model: the
native path must stay as close to ferrum's exact float path (which matches transformers to ~2e-3,
test_models_gemma3.py) as llama.cpp is, and close to llama.cpp itself. Measured on 48 tokens of
README.md (llama.cpp's AVX-512 build): Gemma-3-270M KL(exact || native) 1.1e-2 vs KL(exact ||
llama.cpp) 8.7e-3, KL(llama.cpp || native) 1.3e-2, top-1 agreement with llama.cpp 92%; synthetic
Qwen3-MoE 7.0e-4 vs 7.0e-4, 1.1e-4, 96%.
"""

from pathlib import Path

import pytest
import torch

from ferrum_mps import load_model, native
from ferrum_mps.loading import load_tokenizer
from ferrum_mps.testing.synthetic import synthetic_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run installs it)")

pytestmark = pytest.mark.native
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _kl(ref, other):
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def _logits(path, n):
    ids = load_tokenizer(path)(README, return_tensors="pt").input_ids[:, :n]
    model = load_model(path, device="cpu", progress=False)
    with torch.inference_mode():
        with native.disabled():
            exact = model(ids).logits[0].float()
        cache = model.static_cache(1, ids.shape[1])  # the decode plan, token by token
        ours = torch.cat([model(ids[:, i : i + 1], past_key_values=cache).logits[0] for i in range(ids.shape[1])])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(llm.scores[: ids.shape[1]], dtype=torch.float32)
    return exact, ours, theirs


@pytest.mark.parametrize("which", ["gemma", "qwen3moe"])
def test_native_logits_as_close_to_exact_as_llama_cpp(which, gemma_gguf_path):
    path = gemma_gguf_path if which == "gemma" else synthetic_gguf("qwen3moe").path
    exact, ours, theirs = _logits(path, 48)
    # llama.cpp itself is off the exact model (its activations are int8 too): it must not be 0, or the
    # comparison below says nothing.
    assert _kl(exact, theirs) > 1e-6
    assert _kl(exact, ours) < 2 * _kl(exact, theirs) + 1e-4
    agree = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()  # noqa: E731
    # Disagreeing with llama.cpp no more often than the exact model does, give or take 10 points.
    assert agree(ours, theirs) >= agree(exact, theirs) - 0.1, (agree(ours, theirs), agree(exact, theirs))
    assert _kl(theirs, ours) < 3 * _kl(exact, theirs) + 1e-4
