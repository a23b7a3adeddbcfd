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


def test_failure_inside_transformers_is_one_gguf_error(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", {"tokenizer.ggml.model": "no-such-tokenizer-model"})
    with pytest.raises(GGUFError, match="cannot build its tokenizer"):
        load_tokenizer(bad, cache=False)


def test_truncated_file_never_reaches_transformers(qwen, tmp_path):
    data = qwen.read_bytes()
    bad = tmp_path / "cut.gguf"
    for n in np.linspace(0, len(data) - 32, 40).astype(int):  # the last 31 bytes may be padding
        bad.write_bytes(data[:n])
        with pytest.raises(GGUFError, match="cut.gguf"):
            load_tokenizer(bad, cache=False)


# ------------------------------------------------------------------ the CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ferrum_mps", *args], capture_output=True, text=True, timeout=300)


def test_cli_one_line_exit_1(qwen, tmp_path):
    cases = [
        rewrite(qwen, tmp_path / "bos.gguf", {"tokenizer.ggml.bos_token_id": (-1, VT.INT32)}),
        rewrite(qwen, tmp_path / "tmpl.gguf", {"tokenizer.chat_template": "{% if %}\n{% endif"}),
    ]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(qwen.read_bytes()[:5000])
    cases.append(cut)
    for path in cases:
        for cmd in (["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"],
                    ["info", str(path)]):
            if cmd[0] == "info" and path != cut:
                continue  # info reads the metadata only: these files are structurally fine
            r = run_cli(*cmd)
            assert r.returncode == 1, (cmd, r.returncode, r.stderr[-2000:])
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
