"""Qwen3 dense: GQA with per-head QK RMSNorm, SwiGLU MLP, no biases."""

from __future__ import annotations

from .config import GGUFConfig, common_config
from .modeling import GGUFForCausalLM


class Qwen3ForCausalLM(GGUFForCausalLM):
    gguf_architectures = ("qwen3",)

    @classmethod
    def config_from_gguf(cls, md: dict, tensors: dict) -> GGUFConfig:
        return GGUFConfig(**common_config(md, tensors, "qwen3"), qk_norm=True)
