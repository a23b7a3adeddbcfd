"""The eager MPS path of a decoder layer on a StaticCache: the layer launches its kernels itself.

Host time per layer with every kernel stubbed (benchmarks/bench_decode_budget.py, synthetic
Qwen3-30B-A3B dims, 9 launches per layer): 128 us with one `torch.ops.ferrum` op per kernel
through the dispatcher, 74 us calling the launch functions directly (`--launch dispatcher
layer`). One registered op per layer would pay one dispatch on top of the direct calls (3.6 us for
a Library-defined op with the layer's 12 weights as a Tensor[], measured) and buy nothing on the
eager path, so the layer calls the launch functions as plain Python; the per-kernel
ops stay what the CPU, torch.compile (which traces them) and a DynamicCache run.

Validation: what depends on the weights (qtypes with Metal kernels, norm weight dtypes, head dims)
is checked by the checked MPS functions on a layer's first call for an activation dtype and
device; what depends on one forward's inputs (cache tensors, positions, mask) is checked by the
first layer of every forward (the StaticCache makes every layer's tensors alike). The other
calls only allocate and launch.
"""

from __future__ import annotations

from torch import nn

from ferrum_mps.ops import attention as _attn
from ferrum_mps.ops import fused_linear as _fl
from ferrum_mps.ops import linear as _lin
from ferrum_mps.ops import moe as _moe
from ferrum_mps.ops import norm as _norm

from ferrum_mps.nn.linear import QuantLinear

# The same launches with (CHECKED) and without (UNCHECKED) their argument checks.
CHECKED = dict(norm=_norm.rms_norm_mps, add=_norm.add_rms_norm_mps, qkv=_fl.qkv_linear_mps,
               qk=_norm.qk_norm_rope_cache_mps, attn=_attn.decode_attention_mps, gate_up=_fl.gate_up_act_mps,
               route=_norm.moe_gate_route_mps)
UNCHECKED = dict(norm=_norm.launch_rms_norm, add=_norm.launch_add_rms_norm, qkv=_fl.launch_qkv_linear,
                 qk=_norm.launch_qk_norm_rope_cache, attn=_attn.launch_decode_attention, gate_up=_fl.launch_gate_up_act,
                 route=_norm.launch_moe_gate_route)


def _pre(norm):
    return None if norm is None else norm.weight


def _linear(lin, x):
    y = _lin.qlinear_mps(x, lin.raw, lin.qtype, lin.out_features, lin.in_features)  # its own cached plan
    return y if lin.bias is None else y + lin.bias.to(y.dtype)


class LayerLaunch:
    """`Block.forward` on a StaticCache as direct calls of the MPS launch functions (same kernels,
    same results as the ops' MPS implementations). Holds the block's submodules, reads their
    tensors per call (so `.to()` of the model is seen)."""

    def __init__(self, block):
        from ferrum_mps.nn.moe import FusedMoE

        from .layers import MLP

        self.block, self.attn, self.first = block, block.self_attn, block.self_attn.layer_idx == 0
        m = block.mlp
        # The launches read QuantLinear's raw bytes and skip the submodules' __call__: a swapped-in
        # projection (nn.Linear, a LoRA wrapper) or a forward hook on any submodule sends the layer
        # back to the ops path, which calls what it cannot fuse.
        a = block.self_attn
        self.projections = [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        if isinstance(m, MLP):
            self.projections += [m.gate_proj, m.up_proj, m.down_proj]
        self.submodules = list(block.modules())[1:]
        if isinstance(m, MLP):
            self.ffn = self._mlp
        elif isinstance(m, FusedMoE) and isinstance(m.gate, nn.Linear) and m.gate.bias is None:
            self.ffn = self._moe
        else:  # anything else runs its module (through the ops)
            self.ffn = lambda n, f: m(n)  # noqa: E731
        self.checked_for = None  # (dtype, device) the weights were checked for

    def usable(self) -> bool:
        # fusable()'s rule; the projections' hooks are checked with every other submodule's
        return all(type(p) is QuantLinear for p in self.projections) and not any(
            s._forward_hooks or s._forward_pre_hooks for s in self.submodules)

    def __call__(self, x, step, pending):
        b, a = self.block, self.attn
        key = (x.dtype, x.device)
        f = CHECKED if key != self.checked_for else UNCHECKED
        fs = CHECKED if self.first else f  # the per-forward inputs: checked once per forward
        if pending is None:
            n = f["norm"](x, b.input_layernorm.weight, b.input_layernorm.eps)
        else:
            n, x = f["add"](pending[0], x, b.input_layernorm.weight, b.input_layernorm.eps, _pre(pending[1]))
        B, T, _ = n.shape
        p, k, v = a.q_proj, a.k_proj, a.v_proj
        q, k, v = f["qkv"](n, p.raw, p.qtype, k.raw, k.qtype, v.raw, v.qtype, p.out_features, k.out_features, p.in_features)
        if a.q_bias is not None:
            q, k, v = q + a.q_bias, k + a.k_bias, v + a.v_bias
        q, k, v = q.view(B, T, a.nh, a.hd), k.view(B, T, a.nkv, a.hd), v.view(B, T, a.nkv, a.hd)
        kind = int(b.sliding)
        rope = step.ropes[kind]
        kc, vc = step.cache.layer(a.layer_idx, k)
        q = fs["qk"](q, k, v, _pre(a.q_norm), _pre(a.k_norm), a.eps, rope.inv_freq, step.position_ids, rope.interleaved,
                     kc, vc, step.cache_position)
        o = fs["attn"](q, kc, vc, step.cache_position, step.attention_mask, step.windows[kind], a.scale)
        h = _linear(a.o_proj, o)
        ln = b.post_attention_layernorm
        n, x = f["add"](h, x, ln.weight, ln.eps, _pre(b.post_attn_norm))
        h = self.ffn(n, f)
        self.checked_for = key
        return x, (h, b.post_ffn_norm)

    def _mlp(self, n, f):
        m = self.block.mlp
        g, u = m.gate_proj, m.up_proj
        h = f["gate_up"](n, g.raw, g.qtype, u.raw, u.qtype, g.out_features, g.in_features, m.act_name)
        return _linear(m.down_proj, h)

    def _moe(self, n, f):
        m = self.block.mlp
        x = n.reshape(-1, m.hidden_size)
        weights, ids = f["route"](x, m.gate.weight, m.top_k, m.norm_topk_prob)
        out = _moe.moe_ffn_mps(x, weights, ids, m.gate_raw, m.up_raw, m.down_raw,  # its own cached plan
                               m.gate_qtype, m.up_qtype, m.down_qtype, m.intermediate_size)
        return out.view(n.shape)
