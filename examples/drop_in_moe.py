"""Drop ferrum's quantized modules into a transformers model: FusedMoE for Qwen3MoeSparseMoeBlock,
QuantLinear for the attention nn.Linears.

A small Qwen3-MoE is built by transformers from a config (random weights, fixed seed). Each
swapped module holds GGUF blocks (Q4_K / Q6_K raw bytes). The reference is the same transformers
model with those very blocks dequantized by gguf-py into its float weights: the two must agree
to float32 rounding, and pick the same greedy tokens.

    python examples/drop_in_moe.py
"""

import copy

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import ferrum_mps

torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, moe_intermediate_size=256,
                        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
model = Qwen3MoeForCausalLM(config).eval()
with torch.no_grad():  # O(1) activations, so that the logits are far from ties
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif "embed" in name:
            p.normal_()
        else:
            p.normal_(std=p.shape[-1] ** -0.5)


def dequant(raw: torch.Tensor, qtype) -> torch.Tensor:
    """gguf-py's reading of our raw blocks: the independent reference."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw.cpu().numpy(), Q(qtype)), dtype=np.float32))


ours = copy.deepcopy(model)
reference = copy.deepcopy(model)
for layer, ref_layer in zip(ours.model.layers, reference.model.layers):
    # Qwen3MoeSparseMoeBlock -> FusedMoE (gate/up Q4_K, down Q6_K, float router as in llama.cpp files)
    moe = ferrum_mps.FusedMoE.from_hf(layer.mlp, (Q.Q4_K, Q.Q4_K, Q.Q6_K))
    layer.mlp = moe
    with torch.no_grad():
        gate, up = dequant(moe.gate_raw, moe.gate_qtype), dequant(moe.up_raw, moe.up_qtype)
        ref_layer.mlp.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        ref_layer.mlp.experts.down_proj.copy_(dequant(moe.down_raw, moe.down_qtype))
    # nn.Linear -> QuantLinear
    for proj, qtype in (("q_proj", Q.Q4_K), ("k_proj", Q.Q4_K), ("v_proj", Q.Q6_K), ("o_proj", Q.Q4_K)):
        lin = ferrum_mps.QuantLinear.from_float(getattr(layer.self_attn, proj), qtype)
        setattr(layer.self_attn, proj, lin)
        with torch.no_grad():
            ref_lin = getattr(ref_layer.self_attn, proj)
            ref_lin.weight.copy_(dequant(lin.raw, lin.qtype).view_as(ref_lin.weight))

print(ours.model.layers[0].mlp)
print(ours.model.layers[0].self_attn.q_proj)

ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
# The exact float CPU path: the native CPU kernels (the default) quantize activations to int8
# as llama.cpp does, which is ~5e-3 relative, not float32 rounding.
with torch.inference_mode(), ferrum_mps.native.disabled():
    got = ours(ids).logits
    want = reference(ids).logits
    original = model(ids).logits
    greedy_ours = ours.generate(ids[:1], max_new_tokens=10, do_sample=False)
    greedy_ref = reference.generate(ids[:1], max_new_tokens=10, do_sample=False)

diff = (got - want).abs().max().item()
print(f"max |logits ours - transformers on the same dequantized blocks| = {diff:.2e} "
      f"(logits scale {want.abs().max().item():.1f})")
print(f"max |logits ours - original float model| = {(got - original).abs().max().item():.2e} (quantization error)")
same = torch.equal(greedy_ours, greedy_ref)
print(f"greedy tokens identical: {same}")
print("AGREE" if diff < 1e-3 and same else "DISAGREE")
