"""Qwen2 / Qwen2.5: GQA with biases on the q/k/v projections, SwiGLU MLP."""

from __future__ import annotations

from .config import GGUFConfig, common_config
from .modeling import GGUFForCausalLM


class Qwen2ForCausalLM(GGUFForCausalLM):
    gguf_architectures = ("qwen2",)

    @classmethod
    def config_from_gguf(cls, md: dict, tensors: dict) -> GGUFConfig:
        return GGUFConfig(**common_config(md, tensors, "qwen2"), attention_bias=True)
