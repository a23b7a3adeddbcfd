"""Streaming text generation with timing (the library side of `python -m ferrum_mps generate`).

    result = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=64, stream=sys.stdout)
    result.text, result.prefill_tokens_per_s, result.decode_tokens_per_s

Generation itself is transformers' `model.generate()`; the streamer prints tokens as they come and
time-stamps them: prefill ends when the first new token arrives, decode is every token after it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from transformers import TextStreamer


class TimingStreamer(TextStreamer):
    """transformers' TextStreamer writing to `stream` (None: silent) and recording when tokens arrive."""

    def __init__(self, tokenizer, stream=sys.stdout, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.stream = stream
        self.pieces: list[str] = []
        self.token_times: list[float] = []  # one entry per generated token (batch of one)
        self.start: float | None = None

    def put(self, value):
        now = time.perf_counter()
        if self.next_tokens_are_prompt:
            self.start = now
        else:
            self.token_times.extend([now] * value.reshape(-1).numel())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.pieces.append(text)
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class GenerationResult:
    text: str  # the decoded new tokens (what was streamed)
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float  # from generate() start to the first new token
    decode_seconds: float  # from the first new token to the last
    token_ids: list[int]  # the new tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1  # the first new token is part of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def encode_prompt(tokenizer, prompt: str, chat: bool = False, history: list[dict] | None = None) -> torch.Tensor:
    """input_ids [1, T] for a plain prompt, or for a chat turn through the tokenizer's chat template."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt must be a non-empty string")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's GGUF has no chat template (tokenizer.chat_template); run without --chat")
        messages = list(history or []) + [{"role": "user", "content": prompt}]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
        except Exception as e:  # noqa: BLE001 - the template is the file's code: jinja errors, raise_exception(), ...
            raise ValueError(f"the model's chat template (tokenizer.chat_template) failed: {type(e).__name__}: {e}") from e
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate_text(model, tokenizer, prompt: str, *, chat: bool = False, history: list[dict] | None = None,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stream=sys.stdout) -> GenerationResult:
    """Generate from `prompt` (greedy when temperature == 0), streaming the text to `stream`."""
    check_sampling(max_new_tokens, temperature, top_p)
    ids = encode_prompt(tokenizer, prompt, chat=chat, history=history)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context length {limit}")
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    streamer = TimingStreamer(tokenizer, stream=stream, skip_special_tokens=True)
    ids = ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=pad, **sampling)
    new = out[0, ids.shape[1]:].tolist()
    times = streamer.token_times
    prefill = times[0] - streamer.start if times else float("nan")
    decode = times[-1] - times[0] if len(times) > 1 else 0.0
    return GenerationResult(streamer.text, ids.shape[1], len(new), prefill, decode, new)
