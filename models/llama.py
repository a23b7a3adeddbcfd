"""Llama (1/2/3, Mistral-style files): GQA, SwiGLU MLP.

llama.cpp's converter permutes q/k rows for its interleaved ("normal") rope; rotating the
interleaved pairs of the stored weights equals transformers' rotate_half on the original ones.
"""

from __future__ import annotations

from .config import GGUFConfig, common_config
from .modeling import GGUFForCausalLM


class LlamaForCausalLM(GGUFForCausalLM):
    gguf_architectures = ("llama",)

    @classmethod
    def config_from_gguf(cls, md: dict, tensors: dict) -> GGUFConfig:
        if "llama.expert_count" in md and md["llama.expert_count"]:
            raise ValueError("llama-architecture Mixture-of-Experts files (Mixtral) are not supported")
        return GGUFConfig(**common_config(md, tensors, "llama"), rope_interleaved=True)
