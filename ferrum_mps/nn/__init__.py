"""nn.Modules built on the ferrum ops."""

from .linear import QuantEmbedding, QuantLinear
from .moe import FusedMoE

__all__ = ["QuantLinear", "QuantEmbedding", "FusedMoE"]
