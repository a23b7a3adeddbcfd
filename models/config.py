"""Model hyper-parameters read from GGUF metadata: `GGUFConfig` and the helpers families build it with."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .tensors import EMBED, OUTPUT


class GGUFConfig(PreTrainedConfig):
    """Hyper-parameters read from GGUF metadata (field names follow transformers where they exist).

    The sliding window lives in `swa_window`/`swa_layers`, not `sliding_window`/`layer_types`, so that
    transformers' DynamicCache keeps full layers: the window is applied by our mask instead.
    """

    model_type = "ferrum_gguf"

    architecture: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # rope base of sliding-window layers (gemma3)
    rope_scale: float = 1.0  # linear position scaling of the global rope
    rope_interleaved: bool = False  # llama.cpp's "normal" rope on GGUF's permuted llama q/k
    max_position_embeddings: int = 4096
    tied_lm_head: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    sandwich_norms: bool = False  # gemma: norms after attention and after the MLP too
    hidden_act: str = "silu"
    embed_scale: float = 1.0
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    swa_window: int | None = None
    swa_layers: list | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    mlp_only_layers: list | None = None
    tie_word_embeddings: bool = False  # tying is done by sharing raw bytes, not by transformers
    use_cache: bool = True


def meta(md: dict, arch: str, key: str, default=...):
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if default is ...:
        raise ValueError(f"GGUF metadata lacks {full}")
    return default


def common_config(md: dict, tensors: dict, arch: str) -> dict:
    """The llama-like hyper-parameters every family shares, checked against the embedding."""
    if EMBED not in tensors:
        raise ValueError(f"GGUF file lacks tensor {EMBED}")
    vocab, hidden = tuple(tensors[EMBED].shape)
    if meta(md, arch, "embedding_length") != hidden:
        raise ValueError(
            f"metadata inconsistent with tensor shapes: {arch}.embedding_length={meta(md, arch, 'embedding_length')} "
            f"but token_embd.weight is {(vocab, hidden)}"
        )
    if meta(md, arch, "vocab_size", vocab) != vocab:
        raise ValueError(f"metadata inconsistent with tensor shapes: {arch}.vocab_size={md[arch + '.vocab_size']} but token_embd.weight has {vocab} rows")
    heads = meta(md, arch, "attention.head_count")
    kv_heads = meta(md, arch, "attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError("per-layer head counts are not supported")
    if heads % kv_heads:
        raise ValueError(f"attention.head_count {heads} is not a multiple of attention.head_count_kv {kv_heads}")
    head_dim = meta(md, arch, "attention.key_length", hidden // heads)
    if meta(md, arch, "attention.value_length", head_dim) != head_dim:
        raise ValueError("attention.value_length != attention.key_length is not supported")
    rope_dims = meta(md, arch, "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary embedding (rope.dimension_count {rope_dims} of head dim {head_dim}) is not supported")
    scaling = meta(md, arch, "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"rope scaling {scaling!r} is not supported")
    return dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=meta(md, arch, "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=meta(md, arch, "feed_forward_length", 0),
        rms_norm_eps=float(meta(md, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta(md, arch, "rope.freq_base", 10000.0)),
        rope_scale=float(meta(md, arch, "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        max_position_embeddings=meta(md, arch, "context_length", 4096),
        tied_lm_head=OUTPUT not in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
    )


def embed_scale_of(hidden: int) -> float:
    return math.sqrt(hidden)
