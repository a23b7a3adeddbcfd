"""Gemma 3 (text): sandwich norms, GELU-tanh MLP, QK-norm, scaled embeddings, 5 sliding-window layers
(local rope base 10k) for every global one.

llama.cpp stores gemma's RMSNorm weights as (1 + w) already (transformers subtracts 1 when it
loads them), so the shared plain RMSNorm is exact here.
"""

from __future__ import annotations

from .config import GGUFConfig, common_config, embed_scale_of, meta
from .modeling import GGUFForCausalLM

SWA_PATTERN = 6  # llama.cpp and transformers: every 6th layer attends globally
LOCAL_ROPE_BASE = 10000.0


class Gemma3ForCausalLM(GGUFForCausalLM):
    gguf_architectures = ("gemma3",)

    @classmethod
    def config_from_gguf(cls, md: dict, tensors: dict) -> GGUFConfig:
        c = common_config(md, tensors, "gemma3")
        n = c["num_hidden_layers"]
        # Gemma-3-27B scales queries by hidden/heads, the others by head_dim (as llama.cpp does).
        scalar = c["hidden_size"] // c["num_attention_heads"] if n == 62 else c["head_dim"]
        return GGUFConfig(
            **c,
            qk_norm=True,
            sandwich_norms=True,
            hidden_act="gelu_pytorch_tanh",
            embed_scale=embed_scale_of(c["hidden_size"]),
            query_pre_attn_scalar=scalar,
            swa_window=meta(md, "gemma3", "attention.sliding_window", None),
            swa_layers=[bool((i + 1) % SWA_PATTERN) for i in range(n)],
            rope_local_theta=LOCAL_ROPE_BASE,
        )
