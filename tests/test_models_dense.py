"""Dense Qwen3 / Qwen2 / Llama from synthetic llama.cpp-style GGUFs vs transformers on the same files."""

import pytest
import torch

import ferrum_mps.loading as loading
from ferrum_mps.models import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from ferrum_mps.testing.synthetic import synthetic_gguf

CLASSES = {"qwen3": Qwen3ForCausalLM, "qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM}


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_dense_family_matches_transformers(arch):
    synth = synthetic_gguf(arch)  # qwen2: q/k/v biases; qwen3: QK-norm; llama: llama.cpp's permuted q/k
    model = loading.load_model(synth.path, device="cpu", progress=False)
    ref = synth.hf_model(dtype=torch.float32)
    assert type(model) is CLASSES[arch]
    assert (model.config.attention_bias, model.config.qk_norm) == (arch == "qwen2", arch == "qwen3")
    ids = torch.randint(0, 1027, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-3, rtol=0)
    kw = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert model.generate(ids[:1], **kw).tolist() == ref.generate(ids[:1], **kw).tolist()


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_dense_launch_path_equals_cpu_ops(arch, metal_device):
    """The layers' own launches (models/launch.py, MPS's default on a static cache; Metal kernels under the
    harness on CPU) against the CPU ops: q/k/v biases (qwen2), QK-norm (qwen3), interleaved rope (llama)."""
    model = loading.load_model(synthetic_gguf(arch).path, device="cpu", progress=False)
    ids = torch.randint(0, 1027, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = model.static_cache(1, 7)
        want, want_step = model(ids, past_key_values=cache).logits, model(ids[:, :1], past_key_values=cache).logits
        model.launch_path = True
        model.to(metal_device)
        cache = model.static_cache(1, 7)
        got = model(ids.to(metal_device), past_key_values=cache).logits
        got_step = model(ids[:, :1].to(metal_device), past_key_values=cache).logits
    assert all(layer._launch is not None for layer in model.layers)
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=0)
    torch.testing.assert_close(got_step.cpu(), want_step, atol=1e-3, rtol=0)
