"""load_model / load_tokenizer: devices, dtypes, memory, and clear errors on bad input."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch

import ferrum_mps.gguf_file as gguf_file
import ferrum_mps.loading as loading
from ferrum_mps.models import MODELS, model_class
from ferrum_mps.testing.synthetic import synthetic_gguf


@pytest.fixture(scope="module")
def synth():
    return synthetic_gguf("qwen3moe")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def tampered(monkeypatch, path, drop=(), metadata=None):
    """Make load_model see the file at `path` minus `drop` tensors, with `metadata` overrides."""
    f = gguf_file.read_gguf(path)
    f = dataclasses.replace(
        f,
        tensors={n: t for n, t in f.tensors.items() if n not in drop},
        metadata={**f.metadata, **(metadata or {})},
    )
    monkeypatch.setattr(gguf_file, "read_gguf", lambda p, **kw: f)


def test_defaults_cpu_float32_weights_stay_raw(synth):
    model = loading.load_model(synth.path, progress=False)
    if not torch.backends.mps.is_available():
        assert model.device.type == "cpu" and model.dtype == torch.float32
    raw = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers() if t.dtype == torch.uint8}
    floats = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())
    file_size = synth.path.stat().st_size
    # raw blocks ~ the file; the only float weights are norms, the tiny router and rope tables.
    assert 0.9 * file_size < sum(raw.values()) <= file_size
    assert floats < 0.05 * file_size


def test_gemma_resident_memory_close_to_file_size(gemma_gguf_path):
    before = rss()
    model = loading.load_model(gemma_gguf_path, device="cpu", progress=False)
    touched = sum(int(b.max()) for b in model.buffers() if b.dtype == torch.uint8)  # page every weight byte in
    assert touched > 0
    grown, size = rss() - before, gemma_gguf_path.stat().st_size
    # float32 weights would be ~4x the Q4_K_M file; raw bytes stay within it (+ runtime slack).
    assert grown < 1.15 * size + 64 * 2**20, (grown / 2**20, size / 2**20)


def test_dtype_float16_on_cpu_runs(synth):
    model = loading.load_model(synth.path, device="cpu", dtype=torch.float16, progress=False)
    assert model.dtype == torch.float16
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="gpt2") as e:
        loading.load_model(path, device="cpu", progress=False)
    assert all(a in str(e.value) for a in MODELS)
    with pytest.raises(ValueError, match="qwen3moe"):
        model_class("mamba")


def test_missing_tensors_are_named(synth, monkeypatch):
    tampered(monkeypatch, synth.path, drop=("blk.1.attn_k.weight", "blk.0.ffn_down_exps.weight"))
    with pytest.raises(ValueError, match="2 tensor") as e:
        loading.load_model(synth.path, device="cpu", progress=False)
    assert "blk.1.attn_k.weight" in str(e.value) and "blk.0.ffn_down_exps.weight" in str(e.value)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("qwen3moe.attention.head_count", 8, "blk.0.attn_q.weight"),
        ("qwen3moe.expert_feed_forward_length", 768, "ffn_gate_exps"),
        ("qwen3moe.embedding_length", 512, "embedding_length"),
        ("qwen3moe.attention.head_count_kv", 3, "multiple"),
    ],
)
def test_metadata_inconsistent_with_shapes(synth, monkeypatch, key, value, needle):
    tampered(monkeypatch, synth.path, metadata={key: value})
    with pytest.raises(ValueError, match=needle):
        loading.load_model(synth.path, device="cpu", progress=False)


def test_missing_metadata_key_is_named(synth, monkeypatch):
    f = gguf_file.read_gguf(synth.path)
    md = {k: v for k, v in f.metadata.items() if k != "qwen3moe.expert_count"}
    monkeypatch.setattr(gguf_file, "read_gguf", lambda p, **kw: dataclasses.replace(f, metadata=md))
    with pytest.raises(ValueError, match="qwen3moe.expert_count"):
        loading.load_model(synth.path, device="cpu", progress=False)


def test_prompt_longer_than_context(synth):
    model = loading.load_model(synth.path, device="cpu", progress=False)
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, ctx + 1, dtype=torch.long))
    out = model(torch.zeros(1, ctx - 1, dtype=torch.long), use_cache=True, logits_to_keep=1)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 2, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="context length"):
        model.static_cache(1, ctx + 1)
    with pytest.raises(ValueError, match="static cache of 8 slots"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), model.static_cache(1, 8), torch.tensor([8]))


def test_bad_devices_dtypes_and_paths(synth, tmp_path):
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="mps"):
            loading.load_model(synth.path, device="mps")
    with pytest.raises(ValueError, match="device"):
        loading.load_model(synth.path, device="nonsense")
    with pytest.raises(TypeError, match="dtype"):
        loading.load_model(synth.path, device="cpu", dtype=torch.int8)
    with pytest.raises(FileNotFoundError):
        loading.load_model(tmp_path / "absent.gguf")
    model = loading.load_model(synth.path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_cached_tokenizer_equals_the_one_built_from_gguf(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = loading.load_tokenizer(synth.path, cache=False)
    loading.load_tokenizer(synth.path)  # builds and saves
    assert list((tmp_path / "ferrum_mps" / "tokenizers").glob("*/tokenizer.json"))
    cached = loading.load_tokenizer(synth.path)  # reads tokenizer.json back
    for text in ["Hello world", "héllo wörld 🙂 \n\t x == 3.14", "<|im_start|>user\nhi<|im_end|>"]:
        assert cached(text).input_ids == fresh(text).input_ids
        assert cached.decode(cached(text).input_ids) == fresh.decode(fresh(text).input_ids)
    msgs = [{"role": "user", "content": "hi"}]
    assert cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == fresh.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert (cached.eos_token_id, cached.bos_token_id, cached.pad_token_id) == (fresh.eos_token_id, fresh.bos_token_id, fresh.pad_token_id)
