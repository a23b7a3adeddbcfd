"""Checks of a model's `{arch}.*` hyper-parameters before any config or module is built from them.

The config code reads these keys as they come: a head count of 0 raised ZeroDivisionError, a float
where an integer belongs flowed into tensor shapes, a NaN rope base or RMS epsilon loaded fine and
gave NaN logits, and a block_count of 10**6 built ~9M expected tensor names (70 s, 2.4 GB) before
reporting them missing; 2**31 never finished. Here each key gets its type and range checked
(messages name the key) and block_count is checked against the blocks the tensors describe, at a
cost proportional to the number of tensors.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .gguf_file import GGUFError

# key (without the "{arch}." prefix) -> smallest allowed value; only keys the models read.
INT_KEYS = {
    "block_count": 1,
    "context_length": 1,
    "embedding_length": 1,
    "feed_forward_length": 1,
    "vocab_size": 1,
    "attention.head_count": 1,
    "attention.head_count_kv": 1,
    "attention.key_length": 1,
    "attention.value_length": 1,
    "attention.sliding_window": 0,  # 0: no window
    "rope.dimension_count": 1,
    "expert_count": 0,
    "expert_used_count": 0,
    "expert_feed_forward_length": 1,
}
POSITIVE_FLOAT_KEYS = ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")
_BLOCK = re.compile(r"blk\.(\d+)\.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model_metadata(md: dict, arch: str, tensors: dict, source: str) -> None:
    """GGUFError naming `source` and the key for hyper-parameters no model can be built from."""

    def fail(msg: str):
        raise GGUFError(f"{source}: {msg}")

    def get(key):
        return md.get(f"{arch}.{key}")

    for key, low in INT_KEYS.items():
        v = get(key)
        if v is None:
            continue
        if isinstance(v, list):
            fail(f"{arch}.{key} is a per-layer array ({len(v)} values); only a single integer is supported")
        if not _is_int(v):
            fail(f"{arch}.{key} must be an integer, got {type(v).__name__} {v!r}")
        if v < low:
            fail(f"{arch}.{key} = {v} must be >= {low}")
    for key in POSITIVE_FLOAT_KEYS:
        v = get(key)
        if v is None:
            continue
        if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            fail(f"{arch}.{key} must be a number, got {type(v).__name__} {v!r}")
        if not (math.isfinite(v) and v > 0):
            fail(f"{arch}.{key} = {v!r} must be a finite number > 0")
    heads, kv_heads = get("attention.head_count"), get("attention.head_count_kv")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        fail(f"{arch}.attention.head_count {heads} is not a multiple of {arch}.attention.head_count_kv {kv_heads}")
    experts, used = get("expert_count") or 0, get("expert_used_count")
    if experts and used is not None and not 1 <= used <= experts:
        fail(f"{arch}.expert_used_count = {used} must be between 1 and {arch}.expert_count = {experts}")
    _check_blocks(get("block_count"), arch, tensors, fail)
    embd = tensors.get("token_embd.weight")
    rows = embd.shape[0] if embd is not None else None
    tokens = md.get("tokenizer.ggml.tokens")
    if rows is not None and isinstance(tokens, list) and len(tokens) > rows:
        fail(f"tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight only {rows} rows")
    for key in TOKEN_ID_KEYS:
        v = md.get(f"tokenizer.ggml.{key}")
        if v is None or rows is None:
            continue
        if not (_is_int(v) and 0 <= v < rows):
            fail(f"tokenizer.ggml.{key} = {v!r} is not a token id of this model (0 to {rows - 1})")


def _check_blocks(n, arch: str, tensors: dict, fail) -> None:
    """block_count must equal the number of blocks the tensor names describe (blk.0. .. blk.{n-1}.)."""
    if n is None:
        return
    if n > len(tensors):  # every block has several tensors: fail before any per-block work
        fail(f"{arch}.block_count = {n} but the file holds only {len(tensors)} tensors")
    present = {int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))}
    missing = [i for i in range(n) if i not in present]
    extra = sorted(i for i in present if i >= n)
    if missing or extra:
        fail(
            f"{arch}.block_count = {n} but the file has tensors for blocks {_ranges(sorted(present))}"
            + (f" (no tensors for block(s) {_ranges(missing)})" if missing else "")
        )


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (bounded length: at most 6 runs)."""
    if not ids:
        return "none"
    runs, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(runs[:6]) + (", ..." if len(runs) > 6 else "")
