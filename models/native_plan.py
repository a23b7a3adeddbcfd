"""The CPU decode step (batch 1, one token, float32, StaticCache) as one native plan.

`Block.forward` on the ops costs ~10 dispatched ops per layer, each a few tens of microseconds of
Python and dispatcher around a kernel of about as long (Gemma-3-270M: 18 layers, ~17 ms a token of
which ~4 ms were host and small-op time). Here the layers are recorded once per cache as a list of
native steps (ferrum_mps.native.Plan: norms, the fused q/k/v and gate/up mat-vecs, q/k norm + rope +
cache write, attention over the cache, MoE routing and experts) and a token is one ctypes call: the
native pool's threads stay hot from step to step instead of handing the cores to torch's OpenMP team
between ops.

The steps are the very C++ functions the ops' native paths call (mat-vecs, norms, rope, attention,
activations, MoE routing and combine), so a token's logits equal the op path's bit for bit (tested);
the float32 helpers are within ~1e-6 relative of torch's. The embedding before the plan and the
lm_head after it stay module calls.

A plan applies only where it computes exactly what `Block.forward` would: plain Blocks whose
projections are QuantLinears of native types without hooks, MLP or FusedMoE feed-forwards with an
unbiased float32 router, float32 weights and caches. Anything else keeps the op path.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _mod

from ferrum_mps import native
from ferrum_mps.nn.linear import QuantLinear
from ferrum_mps.nn.moe import FusedMoE

from .cache import StaticCache
from .layers import MLP, Block


def _f32(t) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _weight(lin) -> bool:
    # (a QuantLinear's own bias: GGUF models keep q/k/v biases beside it, and the fused ops read .raw only)
    return (type(lin) is QuantLinear and lin.qtype in native.QTYPES and lin.in_features % 32 == 0
            and lin.raw.is_contiguous() and lin.bias is None)


def supported(model) -> str | None:
    """Why `model`'s layers cannot run as a plan, or None when they can (weights only; the cache is
    checked per plan)."""
    acts = native.plan_layout()[1]
    for b in model.layers:
        a, m = b.self_attn, b.mlp
        if type(b) is not Block:
            return f"layer {a.layer_idx} is a {type(b).__name__}"
        projections = [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        if type(m) is MLP:
            projections += [m.gate_proj, m.up_proj, m.down_proj]
            if m.act_name not in acts:
                return f"activation {m.act_name}"
        elif type(m) is FusedMoE:
            if not (type(m.gate) is nn.Linear and m.gate.bias is None and _f32(m.gate.weight)):
                return "MoE router is not an unbiased float32 nn.Linear"
            if any(q not in native.QTYPES for q in (m.gate_qtype, m.up_qtype, m.down_qtype)) or m.top_k > 16:
                return "MoE experts' types or top_k"
            if m.hidden_size % 32 or m.intermediate_size % 32:
                return "MoE widths not multiples of 32"
        else:
            return f"feed-forward {type(m).__name__}"
        if not all(_weight(p) for p in projections):
            return f"layer {a.layer_idx}: a projection is not a native-type QuantLinear"
        norms = [b.input_layernorm, b.post_attention_layernorm, b.post_attn_norm, b.post_ffn_norm, a.q_norm, a.k_norm]
        if not all(_f32(n.weight) for n in norms if n is not None) or not all(
                _f32(t) for t in (a.q_bias, a.k_bias, a.v_bias)):
            return f"layer {a.layer_idx}: weights not float32"
        if a.hd % 2 or a.hd > 2048:
            return f"head dim {a.hd}"
    if not _f32(model.norm.weight):
        return "final norm not float32"
    return None


class DecodePlan:
    """One model's decode step on one StaticCache: buffers, the native step list, and what it was
    built from (checked before every token, so a replaced weight or module, a new cache or a hook
    sends the model back to the op path or to a new plan)."""

    def __init__(self, model, cache: StaticCache):
        c = model.config
        H = c.hidden_size
        a0 = model.layers[0].self_attn
        self.model, self.lock = weakref.ref(model), threading.Lock()
        self.cache_ptrs = _cache_ptrs(cache)
        f = lambda n: torch.zeros(n, dtype=torch.float32)  # noqa: E731
        self.x, self.n, self.h, self.out = f(H), f(H), f(H), f(H)
        q, k, v = f(a0.nh * a0.hd), f(a0.nkv * a0.hd), f(a0.nkv * a0.hd)
        qr, o = f(a0.nh * a0.hd), f(a0.nh * a0.hd)
        inter = max([b.mlp.gate_proj.out_features for b in model.layers if type(b.mlp) is MLP] or [1])
        g, u, act = f(inter), f(inter), f(inter)
        ropes, windows = (model.rope, model.rope_local or model.rope), (0, c.swa_window or 0)
        P = self.plan = native.Plan()
        pending = None
        for b in model.layers:
            a, m = b.self_attn, b.mlp
            if pending is None:
                P.add("rms_norm", x=self.x, w=b.input_layernorm.weight, H=H, out=self.n, eps=b.input_layernorm.eps)
            else:
                self._add_norm(pending, b.input_layernorm)
            mats = {}
            for j, (lin, bias, out) in enumerate(((a.q_proj, a.q_bias, q), (a.k_proj, a.k_bias, k), (a.v_proj, a.v_bias, v))):
                mats.update({f"qtype{j}": lin.qtype, f"w{j}": lin.raw, f"n{j}": lin.out_features, f"bias{j}": bias, f"out{j}": out})
            P.add("matvec", x=self.n, k=H, nmat=3, **mats)
            kind = int(b.sliding)
            kc, vc = cache.k[a.layer_idx], cache.v[a.layer_idx]
            qn, kn = (None, None) if a.q_norm is None else (a.q_norm.weight, a.k_norm.weight)
            P.add("qk_rope_cache", q=q, k=k, v=v, Hq=a.nh, Hkv=a.nkv, D=a.hd, qw=qn, kw=kn, inv_freq=ropes[kind].inv_freq,
                  interleaved=int(ropes[kind].interleaved), kc=kc, vc=vc, S=cache.max_len, qout=qr, eps=a.eps)
            P.add("attention", q=qr, kc=kc, vc=vc, Hq=a.nh, Hkv=a.nkv, D=a.hd, S=cache.max_len, window=windows[kind],
                  out=o, scale=a.scale)
            self._linear(a.o_proj, o, self.h)
            self._add_norm((self.h, b.post_attn_norm), b.post_attention_layernorm)
            if type(m) is MLP:
                gp, up = m.gate_proj, m.up_proj
                P.add("matvec", x=self.n, k=H, nmat=2, qtype0=gp.qtype, w0=gp.raw, n0=gp.out_features, out0=g,
                      qtype1=up.qtype, w1=up.raw, n1=up.out_features, out1=u)
                P.add("act_mul", act=m.act_name, g=g, u=u, n=gp.out_features, out=act)
                self._linear(m.down_proj, act, self.h)
            else:
                P.add("moe", x=self.n, H=H, E=m.num_experts, topk=m.top_k, inter=m.intermediate_size,
                      normalize=int(m.norm_topk_prob), router=m.gate.weight, gate_qtype=m.gate_qtype, gate_w=m.gate_raw,
                      up_qtype=m.up_qtype, up_w=m.up_raw, down_qtype=m.down_qtype, down_w=m.down_raw, act="silu",
                      out=self.h)
            pending = (self.h, b.post_ffn_norm)
        self._add_norm(pending, model.norm, normed=self.out)
        modules = list(model.layers.modules()) + [model.norm]
        self.hook_dicts = [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]
        self.assignments = _assignments[0]

    def _add_norm(self, pending, norm, normed=None):
        h, pre = pending
        self.plan.add("add_rms_norm", x=h, residual=self.x, pre=None if pre is None else pre.weight, w=norm.weight,
                      H=self.x.numel(), normed=self.n if normed is None else normed, sum=self.x, eps=norm.eps)

    def _linear(self, lin, x, out):
        self.plan.add("matvec", x=x, k=lin.in_features, nmat=1, qtype0=lin.qtype, w0=lin.raw, n0=lin.out_features,
                      out0=out)

    def current(self, cache) -> bool:
        """True while the model and cache hold what the plan was built from (~5 us a token for Gemma-3-270M's
        289 modules; comparing every parameter's identity instead took 90 us, walking `parameters()` 560 us)."""
        return (_assignments[0] == self.assignments and _cache_ptrs(cache) == self.cache_ptrs
                and not _hooked(self.hook_dicts))

    def run(self, h: torch.Tensor, position: int, slot: int) -> torch.Tensor:
        """h: the embedded token [1, 1, H]; returns the final-normed hidden state [1, 1, H] (a new tensor)."""
        with self.lock:  # one token at a time through the plan's buffers (two threads, one model)
            self.x.copy_(h.reshape(-1))
            self.plan.run(position, slot)
            return self.out.clone().view(1, 1, -1)


def _cache_ptrs(cache) -> tuple:
    return tuple(-1 if t is None else t.data_ptr() for t in cache.k + cache.v)


# Every assignment of a parameter, buffer or submodule anywhere (Module.__setattr__, register_*) bumps
# this count: a plan built before such a change is rebuilt (one wasted rebuild, ~2 ms, when the
# change was elsewhere). In-place changes need nothing: `load_state_dict` writes into the tensors the
# plan reads, and the model's `_apply` (`.to()`, `.float()`) calls invalidate().
_assignments = [0]


def _count(*_):
    _assignments[0] += 1


for _register in (_mod.register_module_parameter_registration_hook, _mod.register_module_buffer_registration_hook,
                  _mod.register_module_module_registration_hook):
    _register(_count)


def _hooked(hook_dicts: list) -> bool:
    """A forward hook on any module the plan replaces, or a global one: the op path must run them."""
    return any(hook_dicts) or bool(_mod._global_forward_hooks or _mod._global_forward_pre_hooks)


def plan_for(model, cache: StaticCache) -> DecodePlan | None:
    """The model's plan for this cache (built on first use), or None when the op path must run."""
    plan = getattr(cache, "_native_plan", None)
    if plan is not None and plan.model() is model and plan.current(cache):
        return plan
    cache._native_plan = None
    if not native.available() or supported(model) is not None:
        return None
    c = model.config
    shape = (1, c.num_key_value_heads, cache.max_len, c.head_dim)
    if any(t is None or t.shape != shape or not _f32(t) for t in cache.k + cache.v):
        return None
    plan = DecodePlan(model, cache)
    if _hooked(plan.hook_dicts):  # the op path calls the hooked modules
        return None
    # The cache holds its plan (which holds the cache's tensors): both go when generate() drops the cache.
    cache._native_plan = plan
    model._native_plan = weakref.ref(plan)
    return plan


def latest(model) -> DecodePlan | None:
    """The plan the model built last, if its cache still exists (introspection, benchmarks, tests)."""
    return None if model._native_plan is None else model._native_plan()


def invalidate() -> None:
    """Every plan is rebuilt before its next token (the model's `_apply` calls this)."""
    _assignments[0] += 1
