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
