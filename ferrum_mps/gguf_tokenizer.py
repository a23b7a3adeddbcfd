"""Checks of the tokenizer a GGUF file describes (`tokenizer.*` metadata), before anything is built from it.

transformers' GGUF tokenizer converters index and zip these arrays without checking them: a bos id of
-1 silently becomes the last token, a short `scores` array drops tokens, a merge naming an unknown
token or a broken chat template fails deep inside `tokenizers`/jinja with an IndexError, KeyError or
a Rust panic. Here every such problem becomes one GGUFError naming the file and the key.
"""

from __future__ import annotations

from typing import Any

from .gguf_file import GGUFError

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "seperator_token_id", "cls_token_id",
               "mask_token_id", "eot_token_id", "eom_token_id")
FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix", "add_sep_token")
TOKEN_TYPES = range(0, 7)  # llama.cpp's llama_token_type: UNDEFINED .. BYTE


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# llama.cpp's tokenizer models that our families use: SentencePiece-style (llama, gemma) and byte-level BPE (gpt2: qwen, llama 3).
TOKENIZER_MODELS = ("gpt2", "llama")


def check_tokenizer_metadata(md: dict, source: str) -> None:
    """GGUFError naming `source` and the key when the `tokenizer.*` metadata cannot describe a working tokenizer."""

    def fail(msg: str):
        raise GGUFError(f"{source}: {msg}")

    model = md.get("tokenizer.ggml.model")
    if model is None:
        fail("no tokenizer in this file (metadata lacks tokenizer.ggml.model)")
    if not isinstance(model, str) or not model:
        fail(f"tokenizer.ggml.model must be a non-empty string, got {model!r}")
    if model not in TOKENIZER_MODELS:
        # transformers 5.0 silently builds some tokenizer for an unknown model; refuse it here.
        fail(f"tokenizer.ggml.model {model!r} is not supported (supported: {', '.join(TOKENIZER_MODELS)})")
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        fail(f"tokenizer.ggml.tokens must be a non-empty array of strings, got {_describe(tokens)}")
    if not all(isinstance(t, str) for t in tokens):
        fail(f"tokenizer.ggml.tokens must hold strings, found {_first_bad(tokens, lambda t: isinstance(t, str))}")
    n = len(tokens)
    for key, ok, kind in (
        ("tokenizer.ggml.scores", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v, "finite numbers"),
        ("tokenizer.ggml.token_type", lambda v: _is_int(v) and v in TOKEN_TYPES, "token types 0-6"),
    ):
        values = md.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != n:
            fail(f"{key} must be an array of {n} {kind} (one per token), got {_describe(values)}")
        if not all(map(ok, values)):
            fail(f"{key} must hold {kind}, found {_first_bad(values, ok)}")
    for key in SPECIAL_IDS:
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and not (_is_int(v) and 0 <= v < n):
            fail(f"tokenizer.ggml.{key} = {v!r} is not a token id of this vocabulary (0 to {n - 1})")
    for key in FLAGS:
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and not isinstance(v, bool):
            fail(f"tokenizer.ggml.{key} must be a bool, got {v!r}")
    merges = md.get("tokenizer.ggml.merges")
    if merges is not None:
        _check_merges(merges, set(tokens), fail)
    template = md.get("tokenizer.chat_template")
    if template is not None:
        _check_template(template, fail)


def _check_merges(merges, vocab: set, fail) -> None:
    if not isinstance(merges, list):
        fail(f"tokenizer.ggml.merges must be an array of strings, got {_describe(merges)}")
    for i, m in enumerate(merges):
        if not isinstance(m, str):
            fail(f"tokenizer.ggml.merges[{i}] must be a string 'left right', got {m!r}")
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            fail(f"tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by one space")
        unknown = [p for p in parts if p not in vocab]
        if unknown:
            fail(f"tokenizer.ggml.merges[{i}] = {m!r} names token(s) not in the vocabulary: {unknown!r}")


def _check_template(template, fail) -> None:
    if not isinstance(template, str):
        fail(f"tokenizer.chat_template must be a string, got {_describe(template)}")
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # older/newer transformers: compile in the same kind of sandbox it uses
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def compile_template(t):
            return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(t)

    try:
        compile_template(template)
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateSyntaxError, transformers wraps some as ImportError
        line = getattr(e, "lineno", None)
        fail(f"tokenizer.chat_template does not compile{f' (line {line})' if line else ''}: {type(e).__name__}: {e}")


def _describe(v) -> str:
    if isinstance(v, list):
        return f"an array of {len(v)} items"
    return "nothing" if v is None else f"{type(v).__name__} {v!r}"[:80]


def _first_bad(values: list, ok) -> str:
    i = next(i for i, v in enumerate(values) if not ok(v))
    return f"{values[i]!r} ({type(values[i]).__name__}) at index {i}"
