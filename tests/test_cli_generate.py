"""`python -m ferrum_mps generate`: streams what the library's greedy generate() produces, then timings."""

import io
import os
import re
import subprocess
import sys

import pytest
import torch

import ferrum_mps.loading as loading
from ferrum_mps.generation import TimingStreamer, generate_text
from ferrum_mps.testing.synthetic import synthetic_gguf

# The CLI runs the native CPU kernels; the in-process reference must run the same path
# (a random synthetic model has near-ties that int8 activations flip vs the float path).
pytestmark = pytest.mark.native

TIMING = [
    r"^load: \d+\.\d+ s \(.+, cpu\)$",
    r"^prefill: (\d+) tokens, \d+\.\d tokens/s$",
    r"^decode: (\d+) tokens, (\d+\.\d|nan) tokens/s$",
]


def _cli(*args, timeout=900):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "ferrum_mps", "generate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _timing_lines(err):
    lines = [line for line in err.splitlines() if re.match(r"^(load|prefill|decode): ", line)]
    assert len(lines) == 3, err[-2000:]
    return [re.match(p, line) for p, line in zip(TIMING, lines)]


@pytest.fixture(scope="module")
def synthetic():
    m = synthetic_gguf("qwen3moe")
    return m, loading.load_model(m.path, device="cpu", progress=False), loading.load_tokenizer(m.path)


def _library_greedy(model, tok, prompt, n, chat=False):
    """The reference: transformers' generate() on our model, decoded by the tokenizer."""
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return ids.shape[1], out[0, ids.shape[1]:], tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_streamer_output_equals_returned_text(synthetic):
    m, model, tok = synthetic
    stream = io.StringIO()
    r = generate_text(model, tok, "The quick brown fox", max_new_tokens=8, stream=stream)
    n_prompt, ids, text = _library_greedy(model, tok, "The quick brown fox", 8)
    assert r.token_ids == ids.tolist()
    assert stream.getvalue() == r.text == text
    assert r.prompt_tokens == n_prompt and r.new_tokens == len(ids) > 1
    assert r.prefill_seconds > 0 and r.decode_seconds > 0
    assert r.decode_tokens_per_s == pytest.approx((r.new_tokens - 1) / r.decode_seconds)


def test_timing_streamer_stamps_each_new_token(synthetic):
    _, model, tok = synthetic
    s = TimingStreamer(tok, stream=None)
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, streamer=s, pad_token_id=0)
    assert len(s.token_times) == out.shape[1] - ids.shape[1] == 5
    assert s.start <= s.token_times[0] and s.token_times == sorted(s.token_times)
    assert s.text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(synthetic):
    _, model, tok = synthetic
    kw = dict(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7, stream=None)
    a, b = generate_text(model, tok, "Hello", **kw), generate_text(model, tok, "Hello", **kw)
    greedy = generate_text(model, tok, "Hello", max_new_tokens=8, stream=None)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids  # temperature 1.5 on O(1) logits departs from argmax


def test_cli_streams_the_library_greedy_continuation(synthetic):
    m, model, tok = synthetic
    prompt = "Once upon a time"
    proc = _cli("--model", str(m.path), "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu")
    n_prompt, _, text = _library_greedy(model, tok, prompt, 6)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    assert out == prompt + text + ("" if text.endswith("\n") else "\n")
    load, prefill, decode = _timing_lines(err)
    assert load and prefill and decode, err[-2000:]
    assert int(prefill[1]) == n_prompt and int(decode[1]) == 6


def test_cli_chat_uses_the_chat_template(synthetic):
    m, model, tok = synthetic
    proc = _cli("--model", str(m.path), "--chat", "--prompt", "hi there", "--max-new-tokens", "4")
    n_prompt, _, text = _library_greedy(model, tok, "hi there", 4, chat=True)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    assert out == text + ("" if text.endswith("\n") else "\n")
    assert int(_timing_lines(err)[1][1]) == n_prompt  # <|im_start|>user ... <|im_start|>assistant


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--device", "mps"] if not torch.backends.mps.is_available() else ["--device", "nonsense"], "not available|invalid"),
    (["--model", "/nonexistent/model.gguf"], "no GGUF file"),
])
def test_cli_bad_input_is_a_clear_error(args, message, synthetic, capsys):
    from ferrum_mps.cli import main

    m = synthetic[0]
    base = [] if "--model" in args else ["--model", str(m.path)]
    assert main(["generate", *base, *args]) != 0
    err = capsys.readouterr().err
    assert re.search(message, err), err[-2000:]


def test_cli_default_model_is_the_embedded_gemma(gemma_gguf_path):
    # No --model: the embedded Gemma-3-270M Q4_K_M. The reference runs first, so the CLI finds the
    # tokenizer it built in the cache instead of rebuilding the 262k vocabulary concurrently.
    prompt, n = "The capital of France is", 2
    model = loading.load_model(gemma_gguf_path, device="cpu", progress=False)
    tok = loading.load_tokenizer(gemma_gguf_path)
    n_prompt, ids, text = _library_greedy(model, tok, prompt, n)
    del model
    rc, out, err = _finish(_cli("--prompt", prompt, "--max-new-tokens", str(n), "--device", "cpu"))
    assert rc == 0, err[-3000:]
    assert out == prompt + text + "\n" and text.strip()
    load, prefill, decode = _timing_lines(err)
    assert "gemma-3-270m" in load[0].lower()
    assert int(prefill[1]) == n_prompt and int(decode[1]) == len(ids) == n


def test_cli_chat_without_template_is_a_clear_error(tmp_path, capsys):
    from ferrum_mps.cli import main
    from ferrum_mps.testing.synthetic import tiny_config, write_gguf

    m = write_gguf(tmp_path / "plain.gguf", tiny_config("qwen3", num_hidden_layers=1), qtypes="q8_0",
                   chat_template=None)
    assert main(["generate", "--model", str(m.path), "--chat", "--max-new-tokens", "1"]) != 0
    assert "no chat template" in capsys.readouterr().err
