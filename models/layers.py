"""The decoder layers shared by every GGUF family: norms, rope, attention, MLP, the block.

Weights arrive as QTensors already on the target device; quantized ones stay raw bytes inside
QuantLinear / FusedMoE, only the tiny F32 norms and biases become float parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GGUFConfig


@dataclass
class Step:
    """What every layer of one forward shares, built once per forward by the model.

    Two kinds of layer: 0 = global attention, 1 = sliding-window attention (gemma3); `ropes`,
    `cos_sin` and `masks` are indexed by the kind.
    """

    cache: Any  # None, a transformers Cache or our StaticCache: update(k, v, layer_idx, {"cache_position": ...})
    cache_position: Tensor  # [T] long: the cache slots of the new tokens
    ropes: tuple  # (global RoPE, sliding RoPE)
    cos_sin: tuple  # per kind: (cos, sin) [B, T, 1, D/2] float32
    masks: tuple  # per kind: bool [B, 1, T, S], True = attend


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
    def __init__(self, c: GGUFConfig, i: int, w: dict, dtype, make_linear):
        super().__init__()
        self.layer_idx = i
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        bias = lambda r: float_param(w[r + "_bias"], dtype) if c.attention_bias else None  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = (make_linear(w[r], bias(r)) for r in ("q", "k", "v"))
        self.o_proj = make_linear(w["o"])
        self.q_norm = RMSNorm(float_param(w["q_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(float_param(w["k_norm"], dtype), c.rms_norm_eps) if c.qk_norm else None

    def forward(self, x, step: Step, kind: int):
        B, T, _ = x.shape
        rope, cs = step.ropes[kind], step.cos_sin[kind]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = rope(q, cs).transpose(1, 2), rope(k, cs).transpose(1, 2), v.transpose(1, 2)
        if step.cache is not None:
            k, v = step.cache.update(k, v, self.layer_idx, {"cache_position": step.cache_position})
        o = sdpa_gqa(q, k, v, step.masks[kind], self.scale)
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
        self.self_attn, self.mlp = Attention(c, i, w, dtype, make_linear), ffn
        self.post_attn_norm = norm("post_attn_norm") if c.sandwich_norms else None
        self.post_ffn_norm = norm("post_ffn_norm") if c.sandwich_norms else None

    def forward(self, x, step: Step):
        h = self.self_attn(self.input_layernorm(x), step, int(self.sliding))
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if self.post_ffn_norm is None else self.post_ffn_norm(h))
