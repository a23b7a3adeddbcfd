"""GGUFForCausalLM: the decoder LM on raw GGUF weights, as a transformers PreTrainedModel.

Families subclass it with a `config_from_gguf` classmethod (and `make_moe` where they have
experts). generate() runs on a StaticCache by default (preallocated, written in place); after
`model.compile_decode()` its one-token steps run a torch.compile'd `decode_step`.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ferrum_mps import native

from . import native_plan
from .cache import StaticCache
from .config import GGUFConfig
from .layers import MLP, Block, RMSNorm, RoPE, Step, float_param
from .tensors import EMBED, OUTPUT, OUTPUT_NORM, ROPE_FREQS, is_moe_layer, layer_tensors

# transformers 5.24 renamed the cache: generate() passes `cache=` and reads `output.cache`, and
# `past_key_values` became a deprecated alias. Older versions pass and read `past_key_values`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GGUFForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder LM on raw GGUF weights. Families subclass it with `config_from_gguf`."""

    config_class = GGUFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["Block"]
    gguf_architectures: tuple[str, ...] = ()  # general.architecture values this class loads

    @classmethod
    def config_from_gguf(cls, metadata: dict, tensors: dict) -> GGUFConfig:
        raise NotImplementedError

    def __init__(self, config: GGUFConfig, tensors: dict, dtype=torch.float32):
        super().__init__(config)
        from ferrum_mps.nn.linear import QuantEmbedding, QuantLinear

        c = config
        make_linear = QuantLinear.from_qtensor
        self.embed_tokens = QuantEmbedding.from_qtensor(tensors[EMBED])
        layers = []
        for i in range(c.num_hidden_layers):
            w = {r: tensors[n] for r, (n, _) in layer_tensors(c, i).items()}
            ffn = self.make_moe(c, w, dtype) if is_moe_layer(c, i) else MLP(w, c.hidden_act, make_linear)
            layers.append(Block(c, i, w, ffn, dtype, make_linear))
        self.layers = torch.nn.ModuleList(layers)
        self.norm = RMSNorm(float_param(tensors[OUTPUT_NORM], dtype), c.rms_norm_eps)
        self.lm_head = make_linear(tensors[EMBED if c.tied_lm_head else OUTPUT])
        factors = tensors.get(ROPE_FREQS)
        factors = factors.dequantize(torch.float32).reshape(-1) if factors is not None else None
        self.rope = RoPE(c.head_dim, c.rope_theta, c.rope_scale, factors, c.rope_interleaved)
        self.rope_local = RoPE(c.head_dim, c.rope_local_theta, 1.0, None, c.rope_interleaved) if c.rope_local_theta else None
        self._compiled_decode = None
        # Eager forwards on a StaticCache: decoder layers call the MPS launch functions themselves
        # (models/launch.py; 128 -> 74 host us per layer at A3B dims). None = on MPS tensors; True =
        # on any device (CPU tensors under the Metal-on-CPU harness); False = always the ops.
        self.launch_path: bool | None = None
        # One-token CPU steps on a StaticCache run as one native plan (models/native_plan.py) while the
        # native kernels are enabled; False keeps them on the ops.
        self.native_decode = True
        self._native_plan = None  # a weak reference to the last plan built (its cache holds it)
        self.post_init()

    def init_weights(self):  # every weight comes from the file: transformers must not re-initialise them
        pass

    def _init_weights(self, module):
        pass

    def make_moe(self, c: GGUFConfig, w: dict, dtype) -> torch.nn.Module:
        """The FFN of a Mixture-of-Experts block from its tensors `w` (roles router, gate/up/down_exps)."""
        raise ValueError(f"{c.architecture} has no Mixture-of-Experts layers")

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    # ------------------------------------------------------------ forward, in its four parts

    def _embed(self, input_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = inputs_embeds.to(self.norm.weight.dtype)
        if self.config.embed_scale != 1.0:
            h = h * torch.tensor(self.config.embed_scale, dtype=h.dtype)
        return h

    def _cache_slots(self, cache, use_cache, cache_position, T, device):
        """(cache, cache_position [T], S = key slots attended, host count of filled slots after this step or None)."""
        if isinstance(cache, StaticCache):
            S = cache.max_len
            if cache_position is None:  # positions from the host-side count: no device read
                cache.check_room(cache.seen, T)
                return cache, torch.arange(cache.seen, cache.seen + T, device=device), S, cache.seen + T
            # Given positions are checked where that costs no sync (CPU tensors); on a GPU the callers
            # derive them from Python ints (generate(), examples/compile_decode.py).
            if cache_position.device.type == "cpu" and not torch.compiler.is_compiling():
                if cache_position.numel() and not (0 <= int(cache_position.min()) and int(cache_position.max()) < S):
                    raise ValueError(f"cache_position {cache_position.tolist()} outside the static cache of {S} slots")
            return cache, cache_position, S, None
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        limit = self.config.max_position_embeddings
        if past + T > limit:
            raise ValueError(f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the context length "
                             f"{limit} of this model")
        return cache, torch.arange(past, past + T, device=device), past + T, None

    def _padding_mask(self, attention_mask, B, S, end):
        """The 2-D mask covering the S key slots (a static cache's unfilled tail counts as kept: causality hides it)."""
        if attention_mask is None:
            return None
        n = attention_mask.shape[-1] if attention_mask.dim() == 2 else -1
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or n < (end if end is not None else S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S})")
        if n < S:
            attention_mask = torch.nn.functional.pad(attention_mask, (0, S - n), value=1)
        return attention_mask

    @staticmethod
    def _positions(position_ids, attention_mask, cache_position, B, T):
        if position_ids is not None:
            return position_ids
        if attention_mask is not None:  # left padding: count only the real tokens
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, cache_position)
        return cache_position[None].expand(B, T)

    def _masks(self, q_pos, S, attention_mask, B):
        """Boolean [B, 1, T, S] masks (True = attend): causal + padding, and the sliding-window one if any."""
        c = self.config
        k_idx = torch.arange(S, device=q_pos.device)
        q = q_pos[:, None]
        allowed = (k_idx[None] <= q)[None].expand(B, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :S].bool()
        # A fully masked row (a left-padding query) would give NaN; let every query see itself.
        allowed = allowed | (k_idx[None] == q)[None]
        full = allowed[:, None]
        if not c.swa_window or not any(c.swa_layers or []):
            return full, full
        return full, (full & (q - k_idx[None] < c.swa_window)[None, None])

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        logits_to_keep=0,
        cache_position=None,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        with self._threads():
            return self._forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                 logits_to_keep, cache_position, cache)

    def _threads(self):
        """native.owning_threads() for CPU forwards and generate() (not while compiling)."""
        if self.norm.weight.device.type != "cpu" or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        return native.owning_threads()

    def generate(self, *args, **kwargs):
        with self._threads():  # the sampling between tokens too: its torch ops would leave OpenMP spinning
            return super().generate(*args, **kwargs)

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                 logits_to_keep, cache_position, cache) -> CausalLMOutputWithPast:
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as `cache` or `past_key_values` (the same object under both names is fine)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self._use_compiled_decode(cache, input_ids, inputs_embeds, cache_position):
            return self._compiled_step(input_ids, cache, attention_mask, logits_to_keep, use_cache)
        if self._use_native_plan(cache, input_ids, inputs_embeds, logits_to_keep):
            logits = self._native_step(input_ids, cache, attention_mask, position_ids, cache_position)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache if use_cache else None})
        h = self._embed(input_ids, inputs_embeds)
        B, T = h.shape[:2]
        cache, cache_position, S, seen_after = self._cache_slots(cache, use_cache, cache_position, T, h.device)
        attention_mask = self._padding_mask(attention_mask, B, S, seen_after)
        position_ids = self._positions(position_ids, attention_mask, cache_position, B, T)
        c = self.config
        launch = (self.launch_path if self.launch_path is not None else h.device.type == "mps") and not torch.compiler.is_compiling()
        step = Step(cache, cache_position, position_ids, attention_mask, (self.rope, self.rope_local or self.rope),
                    (0, c.swa_window or 0), lambda: self._masks(cache_position, S, attention_mask, B), launch)
        pending = None
        for layer in self.layers:
            h, pending = layer(h, step, pending)
        if seen_after is not None:
            cache.seen = seen_after
        return self._logits(h, pending, logits_to_keep, cache if use_cache else None)

    def _logits(self, h, pending, logits_to_keep, cache):
        h = self.norm(h) if pending is None else self.norm.add(pending[0], h, pending[1])[0]
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        return CausalLMOutputWithPast(logits=self.lm_head(h), **{CACHE_NAME: cache})

    # ------------------------------------------------------------ static cache and compiled decoding

    def static_cache(self, batch_size: int | None, max_len: int) -> StaticCache:
        """A StaticCache of `max_len` slots in the model's dtype and device (batch None: sized on first use)."""
        return StaticCache(self.config, batch_size, max_len, self.norm.weight.device, self.norm.weight.dtype)

    def decode_step(self, input_ids, cache: StaticCache, cache_position, attention_mask=None):
        """Logits [B, T, V] of `input_ids` written at cache slots `cache_position` ([T] long) of a StaticCache.

        Fixed shapes, no Python-side state: `torch.compile(model.decode_step, fullgraph=True)` traces it
        in one graph (prefill eagerly with the same call and `cache_position=torch.arange(T)`).
        `attention_mask`, if any, is [B, max_len] (1 = real token).
        """
        B = input_ids.shape[0]
        pos = None if attention_mask is not None else cache_position[None].expand(B, -1)
        return self(input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache,
                    cache_position=cache_position).logits

    def compile_decode(self, **compile_kwargs) -> None:
        """Run generate()'s one-token steps on a StaticCache through `torch.compile(self.decode_step)`.

        Prefill stays eager; each decode step is one compiled graph (fullgraph, static shapes by default).
        `compile_decode(enabled=False)` goes back to eager steps.
        """
        if not compile_kwargs.pop("enabled", True):
            self._compiled_decode = None
            return
        compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._compiled_decode = torch.compile(self.decode_step, **compile_kwargs)

    def _use_compiled_decode(self, cache, input_ids, inputs_embeds, cache_position) -> bool:
        return (self._compiled_decode is not None and isinstance(cache, StaticCache) and cache_position is None
                and inputs_embeds is None and input_ids is not None and input_ids.shape[1] == 1
                and not torch.compiler.is_compiling())

    def _compiled_step(self, input_ids, cache: StaticCache, attention_mask, logits_to_keep, use_cache):
        cache.check_room(cache.seen, 1)
        pos = torch.arange(cache.seen, cache.seen + 1, device=input_ids.device)
        mask = self._padding_mask(attention_mask, input_ids.shape[0], cache.max_len, cache.seen + 1)
        logits = self._compiled_decode(input_ids, cache, pos, mask)
        cache.seen += 1
        return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache if use_cache else None})

    # ------------------------------------------------------------ CPU decode as one native plan

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: the plans' pointers would go stale
        native_plan.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def _use_native_plan(self, cache, input_ids, inputs_embeds, logits_to_keep) -> bool:
        return (self.native_decode and not torch.compiler.is_compiling() and isinstance(cache, StaticCache)
                and inputs_embeds is None and input_ids is not None and input_ids.shape == (1, 1)
                and input_ids.device.type == "cpu" and isinstance(logits_to_keep, int) and native.enabled())

    def _native_step(self, input_ids, cache: StaticCache, attention_mask, position_ids, cache_position):
        """Logits [1, 1, V] of one token through the model's native plan, or None (op path) when no plan
        applies or the mask hides a slot the token attends (left padding)."""
        if cache_position is None:
            slot = cache.seen
            cache.check_room(slot, 1)
        else:
            if cache_position.shape != (1,):
                return None
            slot = int(cache_position[0])
            if not 0 <= slot < cache.max_len:
                raise ValueError(f"cache_position [{slot}] outside the static cache of {cache.max_len} slots")
        if attention_mask is not None:
            m = self._padding_mask(attention_mask, 1, cache.max_len, slot + 1)
            if not bool(m[0, : slot + 1].all()):
                return None
        plan = native_plan.plan_for(self, cache)
        if plan is None:
            return None
        position = slot if position_ids is None else int(position_ids.reshape(-1)[-1])
        h = plan.run(self._embed(input_ids, None), position, slot)
        if cache_position is None:
            cache.seen = slot + 1
        return self.lm_head(h)

    # ------------------------------------------------------------ generate() glue

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """generate() decodes on a StaticCache of prompt + max_new_tokens slots unless told otherwise
        (a cache passed in, `cache_implementation=...`, `use_cache=False`, beam search, assisted decoding)."""
        from transformers.generation.configuration_utils import GenerationMode

        own = (
            all(model_kwargs.get(n) is None for n in ("cache", "past_key_values"))
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
            and generation_mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
            and not getattr(generation_config, "is_assistant", False)
            and max_cache_length <= self.config.max_position_embeddings
        )
        if not own:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        model_kwargs[CACHE_NAME] = self.static_cache(None, max_cache_length)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if isinstance(inputs.get(CACHE_NAME), StaticCache):
            # transformers < 5.24 passes cache_position tensors; our cache counts its slots on the host instead
            inputs.pop("cache_position", None)
        return inputs

    # generate() reads this signature (e.g. whether inputs_embeds is accepted): keep transformers' one
    prepare_inputs_for_generation.__signature__ = inspect.signature(GenerationMixin.prepare_inputs_for_generation)
