"""FusedMoE: a Qwen3-MoE sparse block whose experts stay GGUF-quantized (raw uint8 stacks)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .. import ops as _ops  # noqa: F401  (registers torch.ops.ferrum.*)
from .. import quants
from .linear import QuantLinear


def _router(qt) -> nn.Module:
    """Router from a GGUF tensor: float nn.Linear for F32/F16/BF16 (what llama.cpp writes), else QuantLinear."""
    experts, hidden = qt.shape
    if quants.check_qtype(qt.qtype) in quants.FLOAT_QTYPES:
        router = nn.Linear(hidden, experts, bias=False)
        with torch.no_grad():
            router.weight.copy_(qt.dequantize(torch.float32))
        return router
    return QuantLinear.from_qtensor(qt)


class FusedMoE(nn.Module):
    """Drop-in for transformers' Qwen3MoeSparseMoeBlock: forward(hidden [..., H]) -> [..., H].

    `gate` is the router (nn.Linear or QuantLinear, [E, H]); `gate_raw`, `up_raw` ([E, inter,
    row bytes of H]) and `down_raw` ([E, H, row bytes of inter]) are GGUF expert stacks kept as
    raw uint8 buffers and consumed by torch.ops.ferrum.moe_route / moe_ffn.
    """

    def __init__(
        self,
        gate: nn.Module,
        gate_raw: Tensor,
        up_raw: Tensor,
        down_raw: Tensor,
        gate_qtype,
        up_qtype,
        down_qtype,
        top_k: int,
        norm_topk_prob: bool = True,
    ):
        super().__init__()
        if any(r.dtype != torch.uint8 or r.dim() != 3 for r in (gate_raw, up_raw, down_raw)):
            raise TypeError("expert stacks must be 3-D torch.uint8 tensors [experts, out, row_nbytes]")
        self.gate = gate
        self.num_experts, self.intermediate_size = gate_raw.shape[:2]
        self.hidden_size = down_raw.shape[1]
        self.top_k, self.norm_topk_prob = int(top_k), bool(norm_topk_prob)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {top_k}")
        self.gate_qtype, self.up_qtype, self.down_qtype = (
            int(quants.check_qtype(q)) for q in (gate_qtype, up_qtype, down_qtype)
        )
        self.register_buffer("gate_raw", gate_raw.contiguous())
        self.register_buffer("up_raw", up_raw.contiguous())
        self.register_buffer("down_raw", down_raw.contiguous())
        # Validate the stack shapes once here rather than on the first forward.
        x = torch.empty(0, self.hidden_size, device="meta")
        ids = torch.empty(0, self.top_k, dtype=torch.int32, device="meta")
        torch.ops.ferrum.moe_ffn(
            x, ids.float(), ids, *(b.to("meta") for b in (gate_raw, up_raw, down_raw)),
            self.gate_qtype, self.up_qtype, self.down_qtype, self.intermediate_size,
        )

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(router_logits [T, E], weights float32 [T, k], ids int32 [T, k]) for x [T, H]."""
        logits = self.gate(x)
        weights, ids = torch.ops.ferrum.moe_route(logits, self.top_k, self.norm_topk_prob)
        return logits, weights, ids

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)
        if isinstance(self.gate, nn.Linear) and self.gate.bias is None:  # router mat-vec + top-k: one launch
            weights, ids = torch.ops.ferrum.moe_gate_route(x, self.gate.weight, self.top_k, self.norm_topk_prob)
        else:
            _, weights, ids = self.route(x)
        out = torch.ops.ferrum.moe_ffn(
            x, weights, ids, self.gate_raw, self.up_raw, self.down_raw,
            self.gate_qtype, self.up_qtype, self.down_qtype, self.intermediate_size,
        )
        return out.view(hidden_states.shape)

    def extra_repr(self) -> str:
        names = (quants.check_qtype(q).name for q in (self.gate_qtype, self.up_qtype, self.down_qtype))
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"inter={self.intermediate_size}, gate/up/down={'/'.join(names)}, norm_topk_prob={self.norm_topk_prob}"
        )

    @classmethod
    def from_gguf(cls, tensors: Mapping, prefix: str, top_k: int, norm_topk_prob: bool = True) -> "FusedMoE":
        """Build from one layer's GGUF tensors (QTensors): `{prefix}.ffn_gate_inp.weight`, `{prefix}.ffn_{gate,up,down}_exps.weight`.

        `prefix` is e.g. "blk.3"; `top_k` is the file's `<arch>.expert_used_count`.
        """
        prefix = prefix.rstrip(".")
        names = [f"{prefix}.ffn_gate_inp.weight"] + [f"{prefix}.ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"GGUF tensors missing for a MoE block: {', '.join(missing)}")
        return cls.from_qtensors(*(tensors[n] for n in names), top_k=top_k, norm_topk_prob=norm_topk_prob)

    @classmethod
    def from_qtensors(cls, router, gate, up, down, top_k: int, norm_topk_prob: bool = True) -> "FusedMoE":
        """Build from the four QTensors of one block: router [E, H], gate/up [E, inter, H], down [E, H, inter]."""
        return cls(_router(router), gate.raw, up.raw, down.raw, gate.qtype, up.qtype, down.qtype, top_k, norm_topk_prob)

    @classmethod
    def from_hf(cls, block: nn.Module, qtypes) -> "FusedMoE":
        """Quantize a transformers Qwen3MoeSparseMoeBlock; `qtypes` is one qtype or (gate, up, down).

        The router stays a float nn.Linear, as in llama.cpp's GGUF files.
        """
        qs = tuple(qtypes) if isinstance(qtypes, (tuple, list)) else (qtypes,) * 3
        if len(qs) != 3:
            raise ValueError(f"qtypes must be one qtype or three (gate, up, down), got {qtypes!r}")
        ex, router = block.experts, block.gate
        inter = ex.down_proj.shape[-1]
        with torch.no_grad():
            w_gate, w_up = ex.gate_up_proj[:, :inter], ex.gate_up_proj[:, inter:]
            raws = [quants.quantize(w.detach().float().cpu().contiguous(), q) for w, q in zip((w_gate, w_up, ex.down_proj), qs)]
            gate = nn.Linear(router.weight.shape[1], router.weight.shape[0], bias=False, dtype=router.weight.dtype)
            gate.weight.copy_(router.weight)
        return cls(gate, *raws, *qs, top_k=router.top_k, norm_topk_prob=router.norm_topk_prob)
