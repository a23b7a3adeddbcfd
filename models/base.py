"""Decoder blocks shared by every GGUF family, and the transformers glue.

One config class (`GGUFConfig`), one model class (`GGUFForCausalLM`) that each family
subclasses with a `config_from_gguf` classmethod and, where the block differs, a small
override. Weights arrive as QTensors already on the target device; quantized ones stay raw
bytes inside QuantLinear / QuantEmbedding / FusedMoE, only the tiny F32 norms become floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache: generate() passes `cache=` and reads `output.cache`, and
# `past_key_values` is a deprecated alias. Older versions pass and read `past_key_values`.
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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


# ---------------------------------------------------------------- GGUF tensor names, in one place


def layer_tensors(c: GGUFConfig, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """role -> (GGUF tensor name, torch-order shape) for block `i`."""
    p, H, D = f"blk.{i}.", c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    t = {
        "attn_norm": (p + "attn_norm.weight", (H,)),
        "q": (p + "attn_q.weight", (q, H)),
        "k": (p + "attn_k.weight", (kv, H)),
        "v": (p + "attn_v.weight", (kv, H)),
        "o": (p + "attn_output.weight", (H, q)),
        "ffn_norm": (p + "ffn_norm.weight", (H,)),
    }
    if c.qk_norm:
        t |= {"q_norm": (p + "attn_q_norm.weight", (D,)), "k_norm": (p + "attn_k_norm.weight", (D,))}
    if c.attention_bias:
        t |= {"q_bias": (p + "attn_q.bias", (q,)), "k_bias": (p + "attn_k.bias", (kv,)), "v_bias": (p + "attn_v.bias", (kv,))}
    if c.sandwich_norms:
        t |= {"post_attn_norm": (p + "post_attention_norm.weight", (H,)), "post_ffn_norm": (p + "post_ffw_norm.weight", (H,))}
    if is_moe_layer(c, i):
        E, I = c.num_experts, c.moe_intermediate_size
        t |= {
            "router": (p + "ffn_gate_inp.weight", (E, H)),
            "gate_exps": (p + "ffn_gate_exps.weight", (E, I, H)),
            "up_exps": (p + "ffn_up_exps.weight", (E, I, H)),
            "down_exps": (p + "ffn_down_exps.weight", (E, H, I)),
        }
    else:
        I = c.intermediate_size
        t |= {"gate": (p + "ffn_gate.weight", (I, H)), "up": (p + "ffn_up.weight", (I, H)), "down": (p + "ffn_down.weight", (H, I))}
    return t


def model_tensors(c: GGUFConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads: GGUF name -> expected shape."""
    t = {"token_embd.weight": (c.vocab_size, c.hidden_size), "output_norm.weight": (c.hidden_size,)}
    if not c.tied_lm_head:
        t["output.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        t |= dict(layer_tensors(c, i).values())
    return t


def is_moe_layer(c: GGUFConfig, i: int) -> bool:
    return c.num_experts > 0 and i not in (c.mlp_only_layers or [])


def check_tensors(c: GGUFConfig, tensors: dict, source: str = "GGUF file") -> None:
    """ValueError naming every missing tensor, or every tensor whose shape contradicts the metadata."""
    want = model_tensors(c)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise ValueError(f"{source} ({c.architecture}) lacks {len(missing)} tensor(s): {', '.join(missing)}")
    bad = [f"{n} has shape {tuple(tensors[n].shape)}, metadata implies {s}" for n, s in want.items() if tuple(tensors[n].shape) != s]
    if bad:
        raise ValueError(f"{source}: metadata inconsistent with tensor shapes: " + "; ".join(bad))


# ---------------------------------------------------------------- blocks


def float_param(qt, dtype) -> nn.Parameter:
    return nn.Parameter(qt.dequantize(torch.float32).reshape(qt.shape).to(dtype), requires_grad=False)


class RMSNorm(nn.Module):
    # GGUF already stores gemma's (1 + w), so one plain variant serves every family.
    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RoPE(nn.Module):
    def __init__(self, head_dim: int, base: float, scale: float = 1.0, freq_factors=None, interleaved=False):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if freq_factors is not None:  # llama3-style rope_freqs.weight divides the frequencies
            inv = inv / freq_factors.float().cpu()
        self.register_buffer("inv_freq", inv / scale, persistent=False)
        self.interleaved = interleaved

    def cos_sin(self, position_ids):  # [B, T] -> 2 x [B, T, 1, D/2] float32
        f = position_ids[..., None].float() * self.inv_freq
        return f.cos()[:, :, None], f.sin()[:, :, None]

    def __call__(self, x, cs):  # x [B, T, heads, D]
        cos, sin = cs
        if self.interleaved:
            x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def sdpa_gqa(q, k, v, mask, scale):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D]: the G query heads of a kv head become G x T query rows,
    so no backend needs GQA support and the cache is never repeated."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    if mask is not None and G > 1:
        mask = mask[:, :, None].expand(-1, -1, G, -1, -1).reshape(mask.shape[0], 1, G * T, mask.shape[-1])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, Hq, T, D)


class Attention(nn.Module):
    def __init__(self, c: GGUFConfig, w: dict, dtype, make_linear):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        bias = lambda r: float_param(w[r + "_bias"], dtype) if c.attention_bias else None  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = (make_linear(w[r], bias(r)) for r in ("q", "k", "v"))
        self.o_proj = make_linear(w["o"])
        self.q_norm = RMSNorm(float_param(w["q_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(float_param(w["k_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None

    def forward(self, x, rope, cs, mask, cache, idx, cache_position):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = rope(q, cs).transpose(1, 2), rope(k, cs).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, idx, {"cache_position": cache_position})
        o = sdpa_gqa(q, k, v, mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, w: dict, act: str, make_linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (make_linear(w[r]) for r in ("gate", "up", "down"))
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: GGUFConfig, i: int, w: dict, ffn: nn.Module, dtype, make_linear):
        super().__init__()
        norm = lambda r: RMSNorm(float_param(w[r], dtype), c.rms_norm_eps)  # noqa: E731
        self.sliding = bool(c.swa_layers and c.swa_layers[i])
        self.input_layernorm, self.post_attention_layernorm = norm("attn_norm"), norm("ffn_norm")
        self.self_attn, self.mlp = Attention(c, w, dtype, make_linear), ffn
        self.post_attn_norm = norm("post_attn_norm") if c.sandwich_norms else None
        self.post_ffn_norm = norm("post_ffn_norm") if c.sandwich_norms else None

    def forward(self, x, rope, cs, mask, cache, idx, cache_position):
        h = self.self_attn(self.input_layernorm(x), rope, cs, mask, cache, idx, cache_position)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))


class StaticCache(nn.Module):
    """Preallocated K/V (gpt-fast style) for torch.compile: fixed shapes, writes at `cache_position`."""

    def __init__(self, config: GGUFConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        if not 0 < max_len <= config.max_position_embeddings:
            raise ValueError(f"static cache length {max_len} outside 1..{config.max_position_embeddings} (the context length)")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.max_len = max_len
        # Only the registered buffers hold the tensors: `.to()` replaces buffers, so a second list
        # of the same tensors would go stale and update() would write into the old ones.
        for i in range(config.num_hidden_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, k, v, idx, cache_kwargs):
        pos = cache_kwargs["cache_position"]
        kc, vc = self._buffers[f"k{idx}"], self._buffers[f"v{idx}"]
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc


# ---------------------------------------------------------------- the model


class GGUFForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder LM on raw GGUF weights. Families subclass it with `config_from_gguf`."""

    config_class = GGUFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["Block"]
    gguf_architectures: tuple[str, ...] = ()  # general.architecture values this class loads

    @classmethod
    def config_from_gguf(cls, metadata: dict, tensors: dict) -> GGUFConfig:
        raise NotImplementedError

    def __init__(self, config: GGUFConfig, tensors: dict, dtype=torch.float32):
        super().__init__(config)
        from ferrum_mps.nn.linear import QuantEmbedding, QuantLinear

        c = config
        make_linear = QuantLinear.from_qtensor
        self.embed_tokens = QuantEmbedding.from_qtensor(tensors["token_embd.weight"])
        layers = []
        for i in range(c.num_hidden_layers):
            w = {r: tensors[n] for r, (n, _) in layer_tensors(c, i).items()}
            ffn = self.make_moe(c, i, tensors, dtype) if is_moe_layer(c, i) else MLP(w, c.hidden_act, make_linear)
            layers.append(Block(c, i, w, ffn, dtype, make_linear))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(float_param(tensors["output_norm.weight"], dtype), c.rms_norm_eps)
        self.lm_head = make_linear(tensors["token_embd.weight" if c.tied_lm_head else "output.weight"])
        factors = tensors.get("rope_freqs.weight")
        factors = factors.dequantize(torch.float32).reshape(-1) if factors is not None else None
        self.rope = RoPE(c.head_dim, c.rope_theta, c.rope_scale, factors, c.rope_interleaved)
        self.rope_local = RoPE(c.head_dim, c.rope_local_theta, 1.0, None, c.rope_interleaved) if c.rope_local_theta else None
        self.post_init()

    def init_weights(self):  # every weight comes from the file: transformers must not re-initialise them
        pass

    def _init_weights(self, module):
        pass

    def make_moe(self, c: GGUFConfig, i: int, tensors: dict, dtype) -> nn.Module:
        raise ValueError(f"{c.architecture} has no Mixture-of-Experts layers")

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _masks(self, q_pos, S, attention_mask, B):
        """Boolean [B, 1, T, S] masks (True = attend): causal + padding, and the sliding-window one if any."""
        c = self.config
        k_idx = torch.arange(S, device=q_pos.device)
        q = q_pos[:, None]
        allowed = (k_idx[None] <= q)[None].expand(B, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :S].bool()
        # A fully masked row (a left-padding query) would give NaN; let every query see itself.
        allowed = allowed | (k_idx[None] == q)[None]
        full = allowed[:, None]
        if not c.swa_window or not any(c.swa_layers or []):
            return full, full
        return full, (full & (q - k_idx[None] < c.swa_window)[None, None])

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep=0,
        cache_position=None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        c = self.config
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as `cache` or `past_key_values` (the same object under both names is fine)")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = inputs_embeds.to(self.norm.weight.dtype)
        if c.embed_scale != 1.0:
            h = h * torch.tensor(c.embed_scale, dtype=h.dtype)
        B, T = h.shape[:2]
        use_cache = c.use_cache if use_cache is None else use_cache
        if isinstance(cache, StaticCache):
            if cache_position is None:
                raise ValueError("a StaticCache needs cache_position (the cache slots of the new tokens)")
            S = cache.max_len
            # index_copy_ on a GPU does not bound-check: validate in eager mode (compiled steps skip the sync).
            if not torch.compiler.is_compiling() and not (0 <= int(cache_position.min()) and int(cache_position.max()) < S):
                raise ValueError(f"cache_position {cache_position.tolist()} outside the static cache of {S} slots")
        else:
            if cache is None and use_cache:
                cache = DynamicCache()
            past = cache.get_seq_length() if cache is not None else 0
            if past + T > c.max_position_embeddings:
                raise ValueError(
                    f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the context length "
                    f"{c.max_position_embeddings} of this model"
                )
            S = past + T
            cache_position = torch.arange(past, S, device=h.device)
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S})")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, cache_position)
            else:
                position_ids = cache_position[None].expand(B, T)
        full, sliding = self._masks(cache_position, S, attention_mask, B)
        cs = self.rope.cos_sin(position_ids)
        cs_local = self.rope_local.cos_sin(position_ids) if self.rope_local is not None else cs
        for i, layer in enumerate(self.layers):
            if layer.sliding:
                h = layer(h, self.rope_local or self.rope, cs_local, sliding, cache, i, cache_position)
            else:
                h = layer(h, self.rope, cs, full, cache, i, cache_position)
        h = self.norm(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        return CausalLMOutputWithPast(logits=logits, **{OUTPUT_CACHE_FIELD: cache if use_cache else None})

    def static_cache(self, batch_size: int, max_len: int) -> StaticCache:
        return StaticCache(self.config, batch_size, max_len, self.norm.weight.device, self.norm.weight.dtype)

    def decode_step(self, input_ids, cache: StaticCache, cache_position, attention_mask=None):
        """Logits [B, T, V] of `input_ids` written at cache slots `cache_position` ([T] long) of a StaticCache.

        Fixed shapes, no Python-side state: `torch.compile(model.decode_step, fullgraph=True)` traces it
        in one graph (prefill eagerly with the same call and `cache_position=torch.arange(T)`).
        """
        B = input_ids.shape[0]
        pos = None if attention_mask is not None else cache_position[None].expand(B, -1)
        return self(input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache, cache_position=cache_position).logits


# ---------------------------------------------------------------- metadata helpers for config_from_gguf


def meta(md: dict, arch: str, key: str, default=...):
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if default is ...:
        raise ValueError(f"GGUF metadata lacks {full}")
    return default


def common_config(md: dict, tensors: dict, arch: str) -> dict:
    """The llama-like hyper-parameters every family shares, checked against the embedding."""
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file lacks tensor token_embd.weight")
    vocab, hidden = tuple(tensors["token_embd.weight"].shape)
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
        tied_lm_head="output.weight" not in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
    )


def embed_scale_of(hidden: int) -> float:
    return math.sqrt(hidden)
