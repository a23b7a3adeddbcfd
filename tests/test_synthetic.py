"""The synthetic GGUF writer: files transformers reads back weight for weight, tokenizer included."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ferrum_mps.testing import synthetic as S

TEXTS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over 1234567 lazy dogs!\n\n  Indented\tline; symbols: {}[]()<>",
    "Ünïcödé, 中文, emoji 🚀 and 'contractions' don't won't I'm",
]


@pytest.fixture(scope="module", params=S.ARCHITECTURES)
def model(request):
    return S.synthetic_gguf(request.param)  # written once into the user cache


def _reader(path):
    return gguf.GGUFReader(str(path))


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_transformers_loads_every_weight_as_gguf_py_dequantizes_it(model):
    ref = model.hf_model()
    ours = S.dequantized_hf_state_dict(model.path, model.config)
    theirs = ref.state_dict()
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        assert torch.equal(value, ours[name]), name


def test_file_holds_the_intended_weights_within_quantization_error(model):
    # Independent of both loaders: regenerate the float weights and compare to the file's values.
    ours = S.dequantized_hf_state_dict(model.path, model.config)
    reader = _reader(model.path)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        assert shape == S.tensor_shapes(model.config)[t.name]
        if len(shape) == 3:
            want = torch.stack([S.float_weight(t.name, shape, model.seed, e) for e in range(shape[0])])
        else:
            want = S.float_weight(t.name, shape, model.seed)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
        if model.config.model_type == "llama" and ("attn_q." in t.name or "attn_k." in t.name):
            heads = model.config.num_attention_heads if "attn_q." in t.name else model.config.num_key_value_heads
            got = S.llama_permute_inverse(got, heads)  # file rows are llama.cpp-permuted
        rel = ((got - want).norm() / want.norm()).item()
        bound = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 0.01, Q.Q6_K: 0.03, Q.Q5_K: 0.05, Q.Q4_K: 0.1}[Q(t.tensor_type)]
        assert rel <= bound, (t.name, Q(t.tensor_type).name, rel)
    # and transformers' q_proj is the unpermuted weight (catches a missing or doubled llama permutation)
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    want = S.float_weight("blk.0.attn_q.weight", tuple(q.shape), model.seed)
    assert ((q - want).norm() / want.norm()).item() < 0.1


def test_metadata_is_llama_cpp_s(model):
    reader = _reader(model.path)
    c = model.config
    arch = S.architecture_of(c)
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == c.num_hidden_layers
    assert _field(reader, f"{arch}.embedding_length") == c.hidden_size
    assert _field(reader, f"{arch}.attention.head_count") == c.num_attention_heads
    assert _field(reader, f"{arch}.attention.head_count_kv") == c.num_key_value_heads
    assert _field(reader, f"{arch}.attention.key_length") == c.head_dim
    assert _field(reader, f"{arch}.context_length") == c.max_position_embeddings
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    if arch == "qwen3moe":
        assert _field(reader, "qwen3moe.expert_count") == c.num_experts
        assert _field(reader, "qwen3moe.expert_used_count") == c.num_experts_per_tok
        assert _field(reader, "qwen3moe.expert_feed_forward_length") == c.moe_intermediate_size != 768
        t = {t.name: t for t in reader.tensors}
        # ggml order is reversed torch order: [in, out, experts]
        assert t["blk.0.ffn_gate_exps.weight"].shape.tolist() == [c.hidden_size, c.moe_intermediate_size, c.num_experts]
        assert t["blk.0.ffn_down_exps.weight"].shape.tolist() == [c.moe_intermediate_size, c.hidden_size, c.num_experts]
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == c.vocab_size
    assert {t.name: Q(t.tensor_type) for t in reader.tensors} == model.qtypes


def test_qtype_policy():
    assert S.mixed_qtype("blk.0.attn_norm.weight", (256,)) == Q.F32
    assert S.mixed_qtype("blk.0.ffn_gate_inp.weight", (8, 256)) == Q.F32
    assert S.mixed_qtype("blk.0.attn_q.weight", (256, 256)) == Q.Q4_K
    assert S.mixed_qtype("blk.0.attn_output.weight", (256, 256)) == Q.Q4_K
    assert S.mixed_qtype("blk.0.attn_v.weight", (128, 256)) == Q.Q6_K
    assert S.mixed_qtype("blk.0.ffn_down_exps.weight", (8, 256, 512)) == Q.Q6_K
    assert S.mixed_qtype("blk.0.ffn_down_exps.weight", (8, 256, 320)) == Q.Q8_0  # 320 % 256 != 0
    assert S.mixed_qtype("blk.0.ffn_up_exps.weight", (8, 320, 200)) == Q.F32  # 200 % 32 != 0
    assert S.mixed_qtype("output.weight", (1000, 256)) == Q.Q6_K
    assert S.mixed_qtype("token_embd.weight", (1000, 256)) == Q.Q8_0


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    cfg = S.tiny_config("qwen3", num_hidden_layers=1)
    a = S.write_gguf(tmp_path / "a.gguf", cfg, seed=3, qtypes="q8_0")
    b = S.write_gguf(tmp_path / "b.gguf", cfg, seed=3, qtypes="q8_0")
    c = S.write_gguf(tmp_path / "c.gguf", cfg, seed=4, qtypes="q8_0")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert set(a.qtypes.values()) == {Q.F32, Q.Q8_0}


def test_f32_file_is_the_float_model_exactly(tmp_path):
    cfg = S.tiny_config("qwen3moe", num_hidden_layers=1, num_experts=4)
    m = S.write_gguf(tmp_path / "f.gguf", cfg, seed=1, qtypes="f32")
    theirs = m.hf_model().state_dict()
    w = S.float_weight("blk.0.ffn_up_exps.weight", (4, 256, 256), 1, expert=2)
    assert torch.equal(theirs["model.layers.0.mlp.experts.gate_up_proj"][2, 256:], w)
    assert torch.equal(theirs["model.embed_tokens.weight"], S.float_weight("token_embd.weight", (1027, 256), 1))


def test_repeated_rows_and_experts_keep_shapes(tmp_path):
    cfg = S.tiny_config("qwen3moe", num_hidden_layers=1, num_experts=4)
    m = S.write_gguf(tmp_path / "r.gguf", cfg, qtypes="q8_0", unique_rows=64, unique_experts=2)
    sd = S.dequantized_hf_state_dict(m.path, cfg)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (256, 256) and torch.equal(q[64:128], q[:64]) and not torch.equal(q[:32], q[32:64])
    gu = sd["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(gu[2], gu[0]) and torch.equal(gu[3], gu[1]) and not torch.equal(gu[0], gu[1])
    ref = S.float_weight("blk.0.attn_q.weight", (64, 256), 0)
    assert ((q[:64] - ref).norm() / ref.norm()).item() < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="supported"):
        S.tiny_config("mamba")
    with pytest.raises(ValueError, match="vocab"):
        S.write_gguf("/nonexistent/x.gguf", S.tiny_config("qwen3", vocab_size=2000), vocab=S.qwen_vocab(1024))


def test_tokenizer_matches_tiktoken_on_the_same_ranks(model):
    tok = model.hf_tokenizer()
    ref = S.tiktoken_reference(model.vocab)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == model.vocab.special_ids["<|im_start|>"] and ids[-1] == model.vocab.special_ids["<|im_end|>"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_full_qwen_vocabulary_matches_tiktoken():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    v = S.qwen_vocab(None)
    assert len(v.tokens) == S.QWEN_VOCAB_SIZE and len(v.merges) == 151643 - 256
    backend, _ = convert_gguf_tokenizer("qwen3moe", {"tokenizer_type": "gpt2", "pre_tokenizer_type": "qwen2",
                                                     "tokens": v.tokens, "token_type": v.token_types,
                                                     "merges": v.merges})
    ref = S.tiktoken_reference(v)
    for text in TEXTS + ["<think>\nreasoning</think> <|im_end|>"]:
        assert backend.encode(text).ids == ref.encode(text, allowed_special="all"), text
