"""QuantLinear and QuantEmbedding: nn.Linear / nn.Embedding over raw GGML bytes.

The weight stays quantized everywhere (CPU, MPS, state_dict, safetensors): the
module holds a uint8 buffer `raw` [out_features, row_nbytes] and calls the
`ferrum::qlinear` / `ferrum::qembedding` ops, so torch.compile sees one opaque op.

The quant type is a plain Python int (torch.compile bakes it in as a constant)
and is also saved as a persistent int64 scalar buffer `qtype_id` so it survives
`state_dict()` and safetensors:

    from safetensors.torch import save_file, load_file
    save_file(layer.state_dict(), "layer.safetensors")
    layer2 = QuantLinear(in_features, out_features, qtype=any_type)
    layer2.load_state_dict(load_file("layer.safetensors"))  # adopts the saved qtype
"""

from __future__ import annotations

import torch
from torch import nn

import ferrum_mps.ops  # noqa: F401  (registers the ferrum ops)

from .. import quants
from ..ops.linear import check_weight
from ..quants import FLOAT_QTYPES

__all__ = ["QuantLinear", "QuantEmbedding"]


class _QuantWeight(nn.Module):
    """A [rows, cols] GGML weight as a `raw` uint8 buffer plus its quant type."""

    def __init__(self, rows: int, cols: int, qtype, device=None):
        super().__init__()
        qt = quants.check_qtype(qtype)
        self.qtype = int(qt)
        self.register_buffer("raw", torch.zeros(rows, quants.row_nbytes(qt, cols), dtype=torch.uint8, device=device))
        self.register_buffer("qtype_id", torch.tensor(int(qt)))  # state_dict key "qtype_id": survives safetensors

    def _set_raw(self, raw: torch.Tensor, qtype, rows: int, cols: int) -> None:
        qt = quants.check_qtype(qtype)
        nb = quants.row_nbytes(qt, cols)
        if raw.dtype != torch.uint8 or raw.numel() != rows * nb:
            raise ValueError(f"raw must be uint8 with {rows} x {nb} bytes for a {qt.name} [{rows}, {cols}] weight, got {raw.dtype} {tuple(raw.shape)}")
        self.qtype = int(qt)
        self.raw = raw.reshape(rows, nb).contiguous()
        # Everything the ops check about the weight, once here: per call (on MPS) the op finds
        # the plan made for this layout and only checks the activation.
        check_weight(self.raw, qt, rows, cols)
        self.qtype_id = torch.tensor(int(qt), device=raw.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved weight may have another quant type than this module was built with:
        # adopt it (and its byte shape) before the usual copy.
        q = state_dict.get(prefix + "qtype_id")
        raw = state_dict.get(prefix + "raw")
        if q is not None and raw is not None and int(q) != self.qtype:
            qt = quants.check_qtype(int(q))
            shape = (self.raw.shape[0], quants.row_nbytes(qt, self._cols))
            self.qtype = int(qt)
            self.raw = torch.empty(shape, dtype=torch.uint8, device=self.raw.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def qtype_name(self) -> str:
        return quants.check_qtype(self.qtype).name


class QuantLinear(_QuantWeight):
    """Drop-in nn.Linear whose weight is GGML-quantized: y = x @ W.T + b, float32 accumulation, x's dtype out."""

    def __init__(self, in_features: int, out_features: int, qtype, bias: bool = False, device=None, dtype=torch.float32):
        self.in_features, self.out_features = in_features, out_features
        self._cols = in_features
        super().__init__(out_features, in_features, qtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_qtensor(cls, qt, bias: torch.Tensor | None = None) -> "QuantLinear":
        """From a `QTensor` of logical shape (out_features, in_features); raw bytes are shared, not copied."""
        if len(qt.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {tuple(qt.shape)}")
        out_f, in_f = (int(s) for s in qt.shape)
        m = cls(in_f, out_f, qt.qtype, bias=False, device="meta")
        m._set_raw(qt.raw, qt.qtype, out_f, in_f)
        if bias is not None:
            if bias.shape != (out_f,):
                raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
            m.bias = nn.Parameter(bias.detach().to(qt.raw.device), requires_grad=False)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, qtype) -> "QuantLinear":
        """Quantize an nn.Linear's weight with `ferrum_mps.quants.quantize` (or store it as F32/F16/BF16)."""
        qt = quants.check_qtype(qtype)
        w = linear.weight.detach()
        if qt in FLOAT_QTYPES:
            raw = w.to(FLOAT_QTYPES[qt]).contiguous().view(torch.uint8)
        else:
            raw = quants.quantize(w.float().cpu(), qt).to(w.device)
        m = cls(linear.in_features, linear.out_features, qt, bias=False, device="meta")
        m._set_raw(raw, qt, linear.out_features, linear.in_features)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.ferrum.qlinear(x, self.raw, self.qtype, self.out_features, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype_name}, bias={self.bias is not None}"


class QuantEmbedding(_QuantWeight):
    """nn.Embedding over a GGML table: forward(ids) -> float32 [*ids.shape, embedding_dim], only the looked-up rows dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype, device=None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._cols = embedding_dim
        super().__init__(num_embeddings, embedding_dim, qtype, device)

    @classmethod
    def from_qtensor(cls, qt) -> "QuantEmbedding":
        if len(qt.shape) != 2:
            raise ValueError(f"QuantEmbedding needs a 2-D table, got shape {tuple(qt.shape)}")
        rows, dim = (int(s) for s in qt.shape)
        m = cls(rows, dim, qt.qtype, device="meta")
        m._set_raw(qt.raw, qt.qtype, rows, dim)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.ferrum.qembedding(ids, self.raw, self.qtype, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype_name}"
