"""Qwen3-MoE (Qwen3-30B-A3B and friends): Qwen3 attention (GQA, per-head QK RMSNorm) + FusedMoE blocks."""

from __future__ import annotations

from torch import nn

from .config import GGUFConfig, common_config, meta
from .modeling import GGUFForCausalLM
from .tensors import layer_name


class Qwen3MoeForCausalLM(GGUFForCausalLM):
    gguf_architectures = ("qwen3moe",)

    @classmethod
    def config_from_gguf(cls, md: dict, tensors: dict) -> GGUFConfig:
        arch = "qwen3moe"
        c = common_config(md, tensors, arch)
        n = c["num_hidden_layers"]
        # llama.cpp writes no key for dense layers: a block with ffn_gate but no router is one.
        dense = [i for i in range(n) if layer_name(i, "router") not in tensors and layer_name(i, "gate") in tensors]
        if dense and not c["intermediate_size"]:
            c["intermediate_size"] = tensors[layer_name(dense[0], "gate")].shape[0]
        return GGUFConfig(
            **c,
            qk_norm=True,
            num_experts=meta(md, arch, "expert_count"),
            num_experts_per_tok=meta(md, arch, "expert_used_count"),
            # transformers 5.23's GGUF mapping drops this key and assumes 768: read it.
            moe_intermediate_size=meta(md, arch, "expert_feed_forward_length"),
            norm_topk_prob=True,  # llama.cpp's qwen3moe graph always renormalises the top-k weights
            mlp_only_layers=dense,
        )

    def make_moe(self, c: GGUFConfig, w: dict, dtype):
        from ferrum_mps.nn.moe import FusedMoE

        moe = FusedMoE.from_qtensors(w["router"], w["gate_exps"], w["up_exps"], w["down_exps"],
                                     top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
        if isinstance(moe.gate, nn.Linear):  # the float router computes in the activation dtype, as in transformers
            moe.gate.to(dtype)
        return moe
