"""ferrum-mps: GGUF-quantized models in PyTorch on Apple GPUs.

Importing the package registers the `torch.ops.ferrum.*` ops (CPU, fake and MPS kernels).
"""

import logging

from . import ops  # noqa: F401  (registers torch.ops.ferrum.*)
from .gguf_file import GGUFError, GGUFFile, QTensor, read_gguf
from .loading import load_model, load_tokenizer
from .nn import FusedMoE, QuantEmbedding, QuantLinear
from .quants import dequantize_raw, quantize

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "read_gguf",
    "GGUFFile",
    "GGUFError",
    "QTensor",
    "quantize",
    "dequantize_raw",
    "QuantLinear",
    "QuantEmbedding",
    "FusedMoE",
    "load_model",
    "load_tokenizer",
]
