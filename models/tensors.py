"""The GGUF tensor-name table: which tensor of the file plays which role, and its expected shape.

Every tensor name the models read is spelled here and nowhere else (MoE experts included);
a block's modules receive `{role: QTensor}` built from `layer_tensors`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import GGUFConfig

EMBED = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"
ROPE_FREQS = "rope_freqs.weight"  # llama3-style frequency factors (optional)

# role -> name inside block i ("blk.{i}." + this)
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "post_attn_norm": "post_attention_norm.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
    "router": "ffn_gate_inp.weight",
    "gate_exps": "ffn_gate_exps.weight",
    "up_exps": "ffn_up_exps.weight",
    "down_exps": "ffn_down_exps.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}


def layer_name(i: int, role: str) -> str:
    return f"blk.{i}.{LAYER_NAMES[role]}"


_BLOCK = re.compile(r"blk\.(\d+)\.")


def block_indices(tensors) -> set[int]:
    """The block numbers i that some tensor name "blk.{i}.*" carries."""
    return {int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))}


def is_moe_layer(c: GGUFConfig, i: int) -> bool:
    return c.num_experts > 0 and i not in (c.mlp_only_layers or [])


def layer_tensors(c: GGUFConfig, i: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """role -> (GGUF tensor name, torch-order shape) for block `i`."""
    H, D = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    shapes = {"attn_norm": (H,), "q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q), "ffn_norm": (H,)}
    if c.qk_norm:
        shapes |= {"q_norm": (D,), "k_norm": (D,)}
    if c.attention_bias:
        shapes |= {"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)}
    if c.sandwich_norms:
        shapes |= {"post_attn_norm": (H,), "post_ffn_norm": (H,)}
    if is_moe_layer(c, i):
        E, I = c.num_experts, c.moe_intermediate_size
        shapes |= {"router": (E, H), "gate_exps": (E, I, H), "up_exps": (E, I, H), "down_exps": (E, H, I)}
    else:
        I = c.intermediate_size
        shapes |= {"gate": (I, H), "up": (I, H), "down": (H, I)}
    return {role: (layer_name(i, role), shape) for role, shape in shapes.items()}


def model_tensors(c: GGUFConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads: GGUF name -> expected shape."""
    t = {EMBED: (c.vocab_size, c.hidden_size), OUTPUT_NORM: (c.hidden_size,)}
    if not c.tied_lm_head:
        t[OUTPUT] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        t |= dict(layer_tensors(c, i).values())
    return t


def check_tensors(c: GGUFConfig, tensors: dict, source: str = "GGUF file") -> None:
    """ValueError naming every missing tensor, or every tensor whose shape contradicts the metadata."""
    want = model_tensors(c)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise ValueError(f"{source} ({c.architecture}) lacks {len(missing)} tensor(s): {', '.join(missing)}")
    bad = [f"{n} has shape {tuple(tensors[n].shape)}, metadata implies {s}" for n, s in want.items() if tuple(tensors[n].shape) != s]
    if bad:
        raise ValueError(f"{source}: metadata inconsistent with tensor shapes: " + "; ".join(bad))
    # The 1-D weights (norms, biases; a few KB) become float parameters: a NaN or inf there loads fine and
    # gives NaN logits. rope_freqs divides the rope frequencies: it must be > 0 too.
    small = [n for n, s in want.items() if len(s) == 1] + ([ROPE_FREQS] if ROPE_FREQS in tensors else [])
    for n in small:
        w = tensors[n].dequantize(torch.float32)
        if not torch.isfinite(w).all() or (n == ROPE_FREQS and not (w > 0).all()):
            raise ValueError(f"{source}: tensor {n} holds {'non-positive' if torch.isfinite(w).all() else 'NaN or inf'} values")
