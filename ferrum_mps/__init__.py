"""ferrum-mps: GGUF-quantized models in PyTorch on Apple GPUs."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
