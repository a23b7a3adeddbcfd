"""The decoder layers shared by every GGUF family: norms, rope, attention, MLP, the block.

Weights arrive as QTensors already on the target device; quantized ones stay raw bytes inside
QuantLinear / FusedMoE, only the tiny F32 norms and biases become float parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ferrum_mps.ops  # noqa: F401  (registers torch.ops.ferrum.*)
from ferrum_mps.nn.linear import QuantLinear
from ferrum_mps.ops.norm import rope

from .cache import StaticCache
from .config import GGUFConfig

_ops = torch.ops.ferrum


class Step:
    """What every layer of one forward shares, built once per forward by the model.

    Two kinds of layer: 0 = global attention, 1 = sliding-window attention (gemma3). Rope tables
    and boolean masks are made on first use: the fused static-cache path needs neither.
    """

    def __init__(self, cache, cache_position: Tensor, position_ids: Tensor, attention_mask, ropes: tuple,
                 windows: tuple, make_masks, launch: bool = False):
        self.cache = cache  # None, a transformers Cache or our StaticCache
        self.static = isinstance(cache, StaticCache)
        self.launch = launch and self.static  # layers call the MPS launch functions themselves (models/launch.py)
        self.cache_position = cache_position  # [T] long: the cache slots of the new tokens
        self.position_ids = position_ids  # [B, T] long: rope positions
        self.attention_mask = attention_mask  # [B, >= S] (1 = real token) or None
        self.ropes = ropes  # per kind
        self.windows = windows  # per kind: sliding window in tokens, 0 = none
        self._make_masks, self._masks, self._cos_sin = make_masks, None, {}

    def cos_sin(self, kind: int):
        """(cos, sin) [B, T, 1, D/2] float32 of the layer kind's rope (one table when both kinds share it)."""
        key = 0 if self.ropes[kind] is self.ropes[0] else kind
        if key not in self._cos_sin:
            self._cos_sin[key] = self.ropes[key].cos_sin(self.position_ids)
        return self._cos_sin[key]

    def mask(self, kind: int):
        """Boolean [B, 1, T, S], True = attend."""
        if self._masks is None:
            self._masks = self._make_masks()
        return self._masks[kind]


def float_param(qt, dtype) -> nn.Parameter:
    return nn.Parameter(qt.dequantize(torch.float32).reshape(qt.shape).to(dtype), requires_grad=False)


class RMSNorm(nn.Module):
    # GGUF already stores gemma's (1 + w), so one plain variant serves every family.
    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x):  # weight * T(x * rsqrt(mean(x^2) + eps)), float32 statistics, in one launch
        return _ops.rms_norm(x, self.weight, self.eps)

    def add(self, x, residual, pre: "RMSNorm | None" = None):
        """(norm(residual + x), residual + x) in one launch; with `pre`, x is normed by it first
        (Gemma's sandwich norms: the same launch, so a sandwich block costs no extra dispatch)."""
        return _ops.add_rms_norm(x, residual, self.weight, self.eps, None if pre is None else pre.weight)


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
        return rope(x, *cs, self.interleaved)  # the fused op's reference semantics


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


def fusable(*modules) -> bool:
    """True when the fused kernels may read these projections' raw bytes instead of calling them:
    each is exactly a QuantLinear without forward hooks (a swapped-in nn.Linear or LoRA wrapper, or a
    hook, gets the module called)."""
    return all(type(m) is QuantLinear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)


class Attention(nn.Module):
    def __init__(self, c: GGUFConfig, i: int, w: dict, dtype, make_linear):
        super().__init__()
        self.layer_idx = i
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.eps = c.rms_norm_eps
        self.q_proj, self.k_proj, self.v_proj = (make_linear(w[r]) for r in ("q", "k", "v"))
        # biases (qwen2) are added after the fused q/k/v mat-vec
        self.q_bias, self.k_bias, self.v_bias = (
            (float_param(w[r + "_bias"], dtype) for r in ("q", "k", "v")) if c.attention_bias else (None, None, None))
        self.o_proj = make_linear(w["o"])
        self.q_norm = RMSNorm(float_param(w["q_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(float_param(w["k_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None
        # decode_attention's Metal kernel takes head dims that are multiples of 16 up to 256
        self.fused_attention = self.hd % 16 == 0 and self.hd <= 256

    def qkv(self, x):
        p, k, v = self.q_proj, self.k_proj, self.v_proj
        if fusable(p, k, v):
            q, k, v = _ops.qkv_linear(x, p.raw, p.qtype, k.raw, k.qtype, v.raw, v.qtype, p.out_features, k.out_features, p.in_features)
        else:
            q, k, v = p(x), k(x), v(x)
        if self.q_bias is not None:
            q, k, v = q + self.q_bias, k + self.k_bias, v + self.v_bias
        return q, k, v

    def forward(self, x, step: Step, kind: int):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k, v = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)
        rope = step.ropes[kind]
        if step.static and self.fused_attention:
            # q/k norm + rope + K/V written into their cache slots, then attention over the cache: 2 launches
            kc, vc = step.cache.layer(self.layer_idx, k)
            qn, kn = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            q = _ops.qk_norm_rope_cache(q, k, v, qn, kn, self.eps, rope.inv_freq, step.position_ids, rope.interleaved,
                                        kc, vc, step.cache_position)
            o = _ops.decode_attention(q, kc, vc, step.cache_position, step.attention_mask, step.windows[kind], self.scale)
            return self.o_proj(o)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cs = step.cos_sin(kind)
        q, k, v = rope(q, cs).transpose(1, 2), rope(k, cs).transpose(1, 2), v.transpose(1, 2)
        if step.cache is not None:
            k, v = step.cache.update(k, v, self.layer_idx, {"cache_position": step.cache_position})
        o = sdpa_gqa(q, k, v, step.mask(kind), self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, w: dict, act: str, make_linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (make_linear(w[r]) for r in ("gate", "up", "down"))
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act_name = act

    def forward(self, x):  # act(x Wg^T) * (x Wu^T) in one launch, then the down projection
        g, u = self.gate_proj, self.up_proj
        if fusable(g, u):
            h = _ops.gate_up_act(x, g.raw, g.qtype, u.raw, u.qtype, g.out_features, g.in_features, self.act_name)
        else:
            h = ACTIVATIONS[self.act_name](g(x)) * u(x)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, c: GGUFConfig, i: int, w: dict, ffn: nn.Module, dtype, make_linear):
        super().__init__()
        norm = lambda r: RMSNorm(float_param(w[r], dtype), c.rms_norm_eps)  # noqa: E731
        self.sliding = bool(c.swa_layers and c.swa_layers[i])
        self.input_layernorm, self.post_attention_layernorm = norm("attn_norm"), norm("ffn_norm")
        self.self_attn, self.mlp = Attention(c, i, w, dtype, make_linear), ffn
        self.post_attn_norm = norm("post_attn_norm") if c.sandwich_norms else None
        self.post_ffn_norm = norm("post_ffn_norm") if c.sandwich_norms else None
        self._launch = None  # models/launch.py's LayerLaunch, made on the first launch-path call

    def forward(self, x, step: Step, pending=None):
        """x: the residual stream; pending: (h, pre) from the previous block, its output h not yet
        added to x and the norm to apply to h first (None unless sandwich norms).
        Returns (x, (h, pre)) for this block: the next block (or the final norm) norms h, adds it
        and normalises in one launch."""
        if step.launch and self.self_attn.fused_attention:
            if self._launch is None:
                from .launch import LayerLaunch

                self._launch = LayerLaunch(self)
            if self._launch.usable():
                return self._launch(x, step, pending)
        if pending is None:
            n = self.input_layernorm(x)
        else:
            n, x = self.input_layernorm.add(pending[0], x, pending[1])
        h = self.self_attn(n, step, int(self.sliding))
        n, x = self.post_attention_layernorm.add(h, x, self.post_attn_norm)
        h = self.mlp(n)
        return x, (h, self.post_ffn_norm)
