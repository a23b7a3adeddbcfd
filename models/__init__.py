"""Model families on raw GGUF weights; `MODELS` maps GGUF `general.architecture` to the class."""

from .cache import StaticCache
from .config import GGUFConfig
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM
from .modeling import GGUFForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[GGUFForCausalLM]] = {
    arch: cls
    for cls in (Qwen3MoeForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, Gemma3ForCausalLM)
    for arch in cls.gguf_architectures
}


def model_class(architecture: str) -> type[GGUFForCausalLM]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(MODELS))}"
        ) from None


__all__ = [
    "MODELS", "model_class", "GGUFConfig", "GGUFForCausalLM", "StaticCache", "Gemma3ForCausalLM",
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
]
