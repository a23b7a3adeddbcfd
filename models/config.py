"""Model hyper-parameters read from GGUF metadata: `GGUFConfig` and the helpers families build it with."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .tensors import EMBED, OUTPUT, block_indices


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


# Every "{arch}.*" key a family reads goes through meta(), which checks it here: a head count of 0
# raised ZeroDivisionError, floats and strings flowed into shapes, a NaN rope base or RMS epsilon
# loaded and gave NaN logits. Integer keys -> smallest allowed value.
INT_KEYS = {
    "block_count": 1,
    "context_length": 1,
    "embedding_length": 1,
    "feed_forward_length": 1,
    "vocab_size": 1,
    "attention.head_count": 1,
    "attention.head_count_kv": 1,
    "attention.key_length": 1,
    "attention.value_length": 1,
    "attention.sliding_window": 0,  # 0: no window
    "rope.dimension_count": 1,
    "expert_count": 0,
    "expert_used_count": 1,
    "expert_feed_forward_length": 1,
}
POSITIVE_FLOAT_KEYS = ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon")
TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}


def meta(md: dict, arch: str, key: str, default=...):
    """`{arch}.{key}` from the metadata (ValueError naming it when absent without default, or of the wrong type/range)."""
    full = f"{arch}.{key}"
    if full not in md:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks {full}")
        return default
    v = md[full]
    if key in INT_KEYS:
        if isinstance(v, list):
            raise ValueError(f"{full} is a per-layer array ({len(v)} values); only a single integer is supported")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{full} must be an integer, got {type(v).__name__} {v!r}")
        if v < INT_KEYS[key]:
            raise ValueError(f"{full} = {v} must be >= {INT_KEYS[key]}")
    elif key in POSITIVE_FLOAT_KEYS:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{full} must be a number, got {type(v).__name__} {v!r}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{full} = {v!r} must be a finite number > 0")
    return v


def check_block_count(n: int, arch: str, tensors: dict) -> None:
    """block_count must equal the blocks the tensor names describe, checked at a cost of one pass over the names
    (a block_count of 10**6 used to build 9M expected names: 70 s and 2.4 GB; 2**31 never finished)."""
    if n > len(tensors):  # every block has several tensors
        raise ValueError(f"{arch}.block_count = {n} but the file holds only {len(tensors)} tensors")
    present = block_indices(tensors)
    missing = [i for i in range(n) if i not in present]
    if missing or max(present, default=-1) >= n:
        raise ValueError(
            f"{arch}.block_count = {n} but the file has tensors for blocks {_ranges(sorted(present))}"
            + (f" (no tensors for block(s) {_ranges(missing)})" if missing else "")
        )


def token_ids(md: dict, vocab: int) -> dict:
    """bos/eos/pad ids, each inside the embedding (a bos of -1 would silently mean the last token)."""
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise ValueError(f"tokenizer.ggml.tokens has {len(tokens)} tokens but {EMBED} only {vocab} rows")
    ids = {}
    for name, key in TOKEN_ID_KEYS.items():
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab):
            raise ValueError(f"tokenizer.ggml.{key} = {v!r} is not a token id of this model (0 to {vocab - 1})")
        ids[name] = v
    return ids


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most 6 runs)."""
    if not ids:
        return "none"
    runs, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(runs[:6]) + (", ..." if len(runs) > 6 else "")


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
        raise ValueError(f"{arch}.attention.head_count {heads} is not a multiple of {arch}.attention.head_count_kv {kv_heads}")
    head_dim = meta(md, arch, "attention.key_length", hidden // heads)
    if meta(md, arch, "attention.value_length", head_dim) != head_dim:
        raise ValueError("attention.value_length != attention.key_length is not supported")
    rope_dims = meta(md, arch, "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"partial rotary embedding (rope.dimension_count {rope_dims} of head dim {head_dim}) is not supported")
    scaling = meta(md, arch, "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"rope scaling {scaling!r} is not supported")
    n_layers = meta(md, arch, "block_count")
    check_block_count(n_layers, arch, tensors)
    experts, used = meta(md, arch, "expert_count", 0), meta(md, arch, "expert_used_count", None)
    if experts and used is not None and used > experts:
        raise ValueError(f"{arch}.expert_used_count = {used} must be between 1 and {arch}.expert_count = {experts}")
    return dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=meta(md, arch, "feed_forward_length", 0),
        rms_norm_eps=float(meta(md, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta(md, arch, "rope.freq_base", 10000.0)),
        rope_scale=float(meta(md, arch, "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        max_position_embeddings=meta(md, arch, "context_length", 4096),
        tied_lm_head=OUTPUT not in tensors,
        **token_ids(md, vocab),
    )


def embed_scale_of(hidden: int) -> float:
    return math.sqrt(hidden)
