"""Well-formed GGUF files whose metadata is wrong: load_model / load_tokenizer / the CLI give one clear error.

Bad files are the synthetic models (ferrum_mps.testing.synthetic) rewritten through gguf-py's
GGUFWriter with some keys changed, retyped or dropped, their tensors copied byte for byte.
"""

import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as VT

from ferrum_mps.gguf_file import GGUFError
from ferrum_mps.loading import load_model, load_tokenizer
from ferrum_mps.testing.synthetic import synthetic_gguf

DROP = object()


@pytest.fixture(scope="module")
def qwen():
    return synthetic_gguf("qwen3moe").path


@pytest.fixture(scope="module")
def llama():
    return synthetic_gguf("llama").path


def rewrite(src, dst, changes=None, drop_tensors=()):
    """Copy `src` to `dst` with gguf-py: `changes` maps key -> DROP, a value (original type) or (value, GGUFValueType)."""
    changes = dict(changes or {})
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    w.kv_data[0].pop("general.architecture", None)  # re-added below in file order
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        change = changes.pop(name, None)
        if change is DROP:
            continue
        if change is None:
            value, vtype = f.contents(), f.types[0]
        elif isinstance(change, tuple):
            value, vtype = change
        else:
            value, vtype = change, f.types[0]
        _add(w, name, value, vtype, f.types[-1] if f.types[0] == VT.ARRAY and change is None else None)
    for name, change in changes.items():  # new keys
        value, vtype = change
        _add(w, name, value, vtype, None)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _add(w, name, value, vtype, sub_type):
    if vtype == VT.ARRAY and sub_type is not None and value and not isinstance(value[0], (list, str)):
        w.add_key_value(name, value, vtype, sub_type=sub_type)
    else:
        w.add_key_value(name, value, vtype)


# ------------------------------------------------------------------ the tokenizer


def tokens_of(path):
    return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents()


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"tokenizer.ggml.bos_token_id": (-1, VT.INT32)}, ["tokenizer.ggml.bos_token_id = -1", "not a token id"]),
        ({"tokenizer.ggml.eos_token_id": 10**6}, ["tokenizer.ggml.eos_token_id = 1000000"]),
        ({"tokenizer.ggml.padding_token_id": (1.5, VT.FLOAT32)}, ["tokenizer.ggml.padding_token_id = 1.5"]),
        ({"tokenizer.ggml.bos_token_id": ("1", VT.STRING)}, ["tokenizer.ggml.bos_token_id = '1'"]),
        ({"tokenizer.ggml.tokens": DROP}, ["tokenizer.ggml.tokens"]),
        ({"tokenizer.ggml.model": DROP}, ["no tokenizer"]),
        ({"tokenizer.ggml.token_type": ([1, 2, 3], VT.ARRAY)}, ["tokenizer.ggml.token_type", "array of 3 items"]),
        ({"tokenizer.ggml.add_bos_token": (1, VT.UINT8)}, ["tokenizer.ggml.add_bos_token must be a bool"]),
        ({"tokenizer.ggml.merges": (["Ġ t", "nosuchtoken x"], VT.ARRAY)}, ["merges[1]", "'nosuchtoken'"]),
        ({"tokenizer.ggml.merges": (["Ġt"], VT.ARRAY)}, ["merges[0]", "two tokens"]),
        ({"tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }"}, ["tokenizer.chat_template does not compile"]),
        ({"tokenizer.chat_template": ([1, 2], VT.ARRAY)}, ["tokenizer.chat_template must be a string"]),
    ],
    ids=["bos-1", "eos-big", "pad-float", "bos-str", "no-tokens", "no-model", "token_type-short", "flag-int",
         "merge-unknown", "merge-shape", "template-syntax", "template-type"],
)
def test_bad_tokenizer_metadata(qwen, tmp_path, changes, needles):
    bad = rewrite(qwen, tmp_path / "bad.gguf", changes)
    with pytest.raises(GGUFError) as e:
        load_tokenizer(bad, cache=False)
    msg = str(e.value)
    assert str(bad) in msg and all(n in msg for n in needles), msg


def test_wrong_length_and_type_arrays(qwen, tmp_path):
    n = len(tokens_of(qwen))
    for changes, needle in [
        ({"tokenizer.ggml.scores": ([0.0] * (n - 1), VT.ARRAY)}, f"array of {n} finite numbers"),
        ({"tokenizer.ggml.scores": ([math.nan] * n, VT.ARRAY)}, "nan"),
        ({"tokenizer.ggml.token_type": ([1] * (n - 1) + [9], VT.ARRAY)}, "9 (int) at index"),
        ({"tokenizer.ggml.tokens": (list(range(n)), VT.ARRAY)}, "must hold strings"),
    ]:
        bad = rewrite(qwen, tmp_path / "bad.gguf", changes)
        with pytest.raises(GGUFError, match="tokenizer.ggml") as e:
            load_tokenizer(bad, cache=False)
        assert needle in str(e.value), str(e.value)


def test_unknown_tokenizer_model_is_refused(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", {"tokenizer.ggml.model": "no-such-tokenizer-model"})
    with pytest.raises(GGUFError, match="tokenizer.ggml.model 'no-such-tokenizer-model' is not supported"):
        load_tokenizer(bad, cache=False)


def test_failure_inside_transformers_is_one_gguf_error(qwen, monkeypatch):
    # Whatever transformers raises while building (KeyError, struct.error, a Rust panic...) becomes one GGUFError.
    import transformers

    def broken(*args, **kwargs):
        raise KeyError("tokenizer.ggml.merges")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(GGUFError, match="cannot build its tokenizer: KeyError"):
        load_tokenizer(qwen, cache=False)


def test_truncated_file_never_reaches_transformers(qwen, tmp_path):
    data = qwen.read_bytes()
    bad = tmp_path / "cut.gguf"
    for n in np.linspace(0, len(data) - 32, 40).astype(int):  # the last 31 bytes may be padding
        bad.write_bytes(data[:n])
        with pytest.raises(GGUFError, match="cut.gguf"):
            load_tokenizer(bad, cache=False)


# ------------------------------------------------------------------ the model's hyper-parameters


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"llama.attention.head_count": 0}, "llama.attention.head_count = 0 must be >= 1"),
        ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv = 0 must be >= 1"),
        ({"llama.attention.head_count_kv": 3}, "not a multiple of llama.attention.head_count_kv 3"),
        ({"llama.block_count": 0}, "llama.block_count = 0 must be >= 1"),
        ({"llama.block_count": 1}, "block_count = 1 but the file has tensors for blocks 0-1"),
        ({"llama.block_count": 3}, "no tensors for block(s) 2"),
        ({"llama.block_count": 10**6}, "block_count = 1000000 but the file holds only"),
        ({"llama.block_count": 2**31}, "block_count = 2147483648"),
        ({"llama.block_count": (2.0, VT.FLOAT32)}, "llama.block_count must be an integer, got float 2.0"),
        ({"llama.embedding_length": ("256", VT.STRING)}, "llama.embedding_length must be an integer, got str '256'"),
        ({"llama.attention.head_count": (True, VT.BOOL)}, "llama.attention.head_count must be an integer, got bool"),
        ({"llama.feed_forward_length": ([512, 512], VT.ARRAY)}, "llama.feed_forward_length is a per-layer array"),
        ({"llama.context_length": 0}, "llama.context_length = 0 must be >= 1"),
        ({"llama.rope.freq_base": math.nan}, "llama.rope.freq_base = nan"),
        ({"llama.rope.freq_base": 0.0}, "llama.rope.freq_base = 0.0"),
        ({"llama.rope.freq_base": -10000.0}, "llama.rope.freq_base = -10000.0"),
        ({"llama.rope.freq_base": ("big", VT.STRING)}, "llama.rope.freq_base must be a number"),
        ({"llama.rope.scaling.type": ("linear", VT.STRING), "llama.rope.scaling.factor": (math.inf, VT.FLOAT32)},
         "llama.rope.scaling.factor = inf"),
        ({"llama.rope.scaling.type": ("linear", VT.STRING), "llama.rope.scaling.factor": (-2.0, VT.FLOAT32)},
         "llama.rope.scaling.factor = -2.0"),
        ({"llama.attention.layer_norm_rms_epsilon": math.nan}, "layer_norm_rms_epsilon = nan"),
        ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon = 0.0"),
        ({"llama.attention.layer_norm_rms_epsilon": -0.5}, "layer_norm_rms_epsilon = -0.5"),
        ({"tokenizer.ggml.bos_token_id": (-1, VT.INT32)}, "tokenizer.ggml.bos_token_id = -1 is not a token id"),
        ({"tokenizer.ggml.eos_token_id": 1027}, "tokenizer.ggml.eos_token_id = 1027 is not a token id of this model (0 to 1026)"),
        ({"tokenizer.ggml.tokens": ([f"t{i}" for i in range(1100)], VT.ARRAY)}, "1100 tokens but token_embd.weight only 1027"),
    ],
)
def test_bad_model_metadata(llama, tmp_path, changes, needle):
    bad = rewrite(llama, tmp_path / "bad.gguf", changes)
    with pytest.raises(GGUFError) as e:
        load_model(bad, device="cpu", progress=False)
    assert str(bad) in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"qwen3moe.expert_used_count": 0}, "qwen3moe.expert_used_count = 0 must be >= 1"),
        ({"qwen3moe.expert_used_count": 9}, "expert_used_count = 9 must be between 1 and qwen3moe.expert_count = 8"),
        ({"qwen3moe.expert_feed_forward_length": (256.0, VT.FLOAT32)}, "expert_feed_forward_length must be an integer"),
    ],
)
def test_bad_moe_metadata(qwen, tmp_path, changes, needle):
    bad = rewrite(qwen, tmp_path / "bad.gguf", changes)
    with pytest.raises(GGUFError, match="bad.gguf") as e:
        load_model(bad, device="cpu", progress=False)
    assert needle in str(e.value), str(e.value)


def test_rewritten_file_loads(llama, tmp_path):
    """The rewrite helper itself changes nothing unasked: the copy loads and matches the original."""
    import torch

    copy = rewrite(llama, tmp_path / "same.gguf")
    ids = torch.tensor([[1, 2, 3]])
    a = load_model(llama, device="cpu", progress=False)(ids).logits
    b = load_model(copy, device="cpu", progress=False, mmap=False)(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("name,value", [("output_norm.weight", math.nan), ("blk.1.ffn_norm.weight", math.inf)])
def test_non_finite_norm_weights(llama, tmp_path, name, value):
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(llama.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(llama)).tensors if t.name == name)
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    with open(bad, "r+b") as fh:
        fh.seek(int(t.data_offset) + 4 * 7)
        fh.write(np.float32(value).tobytes())
    with pytest.raises(GGUFError, match=f"nan.gguf: tensor {name} holds NaN or inf"):
        load_model(bad, device="cpu", progress=False)


def test_mmap_false_model_survives_the_file_changing(llama, tmp_path):
    import torch

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(llama.read_bytes())
    model = load_model(copy, device="cpu", progress=False, mmap=False)
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids).logits
    copy.write_bytes(b"")  # truncated in place: with mmap=True the next forward would die of SIGBUS
    assert torch.equal(model(ids).logits, before)


# ------------------------------------------------------------------ the CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ferrum_mps", *args], capture_output=True, text=True, timeout=300)


def _one_line(stderr, path):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in stderr, stderr[-2000:]


def generate_args(path):
    return ["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]


def test_cli_one_line_exit_1_subprocess(qwen, llama, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(qwen.read_bytes()[:5000])
    for args, path in [
        (generate_args, rewrite(qwen, tmp_path / "bos.gguf", {"tokenizer.ggml.bos_token_id": (-1, VT.INT32)})),
        (lambda p: ["info", str(p)], cut),
    ]:  # each run costs ~8 s of imports: the other families go through main() in-process below
        r = run_cli(*args(path))
        assert r.returncode == 1, (path, r.returncode, r.stderr[-2000:])
        _one_line(r.stderr, path)


def test_cli_main_one_line_exit_1(qwen, llama, tmp_path, capsys):
    from ferrum_mps.cli import main

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(qwen.read_bytes()[:-100])
    nested = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(str(nested), "llama")
    w.add_key_value("x.nested", [[1], [2, 3]], VT.ARRAY)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    cases = [
        (generate_args, rewrite(llama, tmp_path / "heads.gguf", {"llama.attention.head_count": 0})),
        (generate_args, rewrite(qwen, tmp_path / "tmpl.gguf", {"tokenizer.chat_template": "{% if %}\n{% endif"})),
        (generate_args, rewrite(llama, tmp_path / "rope.gguf", {"llama.rope.freq_base": math.nan})),
        (generate_args, rewrite(llama, tmp_path / "blocks.gguf", {"llama.block_count": 2**31})),
        (generate_args, cut),
        (lambda p: ["info", str(p)], nested),
    ]
    for args, path in cases:
        capsys.readouterr()
        assert main(args(path)) == 1
        _one_line(capsys.readouterr().err, path)
    # A template that compiles but fails when rendered: the file's code, not ours.
    failing = rewrite(qwen, tmp_path / "raise.gguf", {"tokenizer.chat_template": "{{ raise_exception('no users here') }}"})
    capsys.readouterr()
    assert main([*generate_args(failing), "--chat"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "chat template" in err and "no users here" in err, err


def test_metadata_byte_flips_give_gguf_error_or_a_working_model(llama, tmp_path):
    """Random bytes in the metadata values: load_model and load_tokenizer raise GGUFError or work (finite logits)."""
    import torch

    data = llama.read_bytes()
    r = gguf.GGUFReader(str(llama))
    spans = [  # the value bytes of each key (after key length, key, value type)
        (f.offset + sum(int(p.nbytes) for p in f.parts[:3]), f.offset + sum(int(p.nbytes) for p in f.parts))
        for name, f in r.fields.items() if not name.startswith("GGUF.")
    ]
    rng = np.random.default_rng(0)
    bad, outcomes = tmp_path / "flip.gguf", {"error": 0, "ok": 0}
    for _ in range(16):  # ~0.5 s each; the 350-round version of this found no other exception type
        b = bytearray(data)
        start, end = spans[rng.integers(len(spans))]
        for at in rng.integers(start, end, size=2):
            b[at] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            logits = load_model(bad, device="cpu", progress=False, mmap=False)(torch.tensor([[1, 2, 3]])).logits
            load_tokenizer(bad, cache=False)("hello world")
            assert torch.isfinite(logits).all()
            outcomes["ok"] += 1
        except GGUFError as e:
            assert str(bad) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] >= 4, outcomes
