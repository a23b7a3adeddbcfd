"""`python -m ferrum_mps serve`, driven by the official `openai` client against a server on a free loopback port.

The reference for every answer is the library itself used the ordinary way: one request at a time
through transformers' `model.generate()` on a second copy of the model, decoded by the tokenizer.
The model is a tiny synthetic Qwen3 (2 layers of 256, Qwen's real vocabulary cut to 1,024 ranks
and its chat template), so CPU decoding is fast; its random weights emit byte tokens that are not
valid UTF-8 alone, which exercises the streamed text's hold-back of incomplete characters.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from types import SimpleNamespace

import openai
import pytest
import torch

from ferrum_mps import load_model, load_tokenizer
from ferrum_mps.server import serving
from ferrum_mps.server.api import Server
from ferrum_mps.server.engine import Engine, IncrementalText
from ferrum_mps.testing.synthetic import synthetic_gguf, tiny_config

MODEL_ID = "tiny-qwen3"
MAX_BATCH = 8


@pytest.fixture(scope="module")
def gguf_path():
    return synthetic_gguf(tiny_config("qwen3"), qtypes="q8_0").path


@pytest.fixture(scope="module")
def ref(gguf_path):
    """Single-request greedy answers of the library (its own model copy, used only by the test thread)."""
    model, tok = load_model(gguf_path, device="cpu", progress=False), load_tokenizer(gguf_path)
    memo = {}

    def prompt_ids(prompt, chat):
        """chat: a user message, or a tuple of (role, content) pairs."""
        if chat:
            turns = [("user", prompt)] if isinstance(prompt, str) else prompt
            return tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
        return tok(prompt).input_ids

    def greedy(prompt, n, chat=False):
        if (prompt, n, chat) not in memo:
            ids = torch.tensor([prompt_ids(prompt, chat)])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            memo[prompt, n, chat] = SimpleNamespace(n_prompt=ids.shape[1], ids=new,
                                                    text=tok.decode(new, skip_special_tokens=True))
        return memo[prompt, n, chat]

    return SimpleNamespace(greedy=greedy, tok=tok, prompt_ids=prompt_ids)


@pytest.fixture(scope="module")
def server(gguf_path):
    model, tok = load_model(gguf_path, device="cpu", progress=False), load_tokenizer(gguf_path)
    engine = Engine(model, tok, max_batch=MAX_BATCH)
    try:
        with serving(Server(engine, model_id=MODEL_ID)) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
            yield SimpleNamespace(url=url, client=client, engine=engine)
    finally:
        engine.close()


def _raw(url, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON body) over http.client: requests the openai client cannot send (bad JSON...)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _health(server):
    status, body = _raw(server.url, "GET", "/health")
    assert status == 200 and body["status"] == "ok", body
    return body


def _idle_health(server, deadline_s: float = 60.0):
    """/health once nothing is queued or running (rows leaked by a batch would keep it busy: fails)."""
    t_end = time.monotonic() + deadline_s
    while True:
        body = _health(server)
        if (body["queued"], body["active"]) == (0, 0) or time.monotonic() > t_end:
            return body
        time.sleep(0.05)


def _complete(client, prompt, max_tokens, chat, stream=False, **kw):
    """(text, finish_reason, usage or None) of one greedy request; a stream is concatenated."""
    kw = dict(model=MODEL_ID, max_tokens=max_tokens, temperature=0, stream=stream, **kw)
    if stream:
        kw["stream_options"] = {"include_usage": True}
    if chat:
        r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
    else:
        r = client.completions.create(prompt=prompt, **kw)
    if not stream:
        c = r.choices[0]
        return (c.message.content if chat else c.text), c.finish_reason, r.usage
    pieces, finish, usage = [], None, None
    for chunk in r:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if chat else c.text
            pieces.append(piece or "")
            finish = c.finish_reason or finish
    return "".join(pieces), finish, usage


# ------------------------------------------------------------------------------ the endpoints


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL_ID]
    assert server.client.models.retrieve(MODEL_ID).id == MODEL_ID
    h = _health(server)
    assert h["model"] == MODEL_ID and h["context"] == 512 and h["max_batch"] == MAX_BATCH


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_answer_is_the_library_answer(server, ref, chat, stream):
    prompt, n = "Tell me about the sea.", 10
    want = ref.greedy(prompt, n, chat)
    text, finish, usage = _complete(server.client, prompt, n, chat, stream=stream)
    assert text == want.text and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (want.n_prompt, n, want.n_prompt + n)


def test_chat_renders_every_turn_through_the_template(server, ref):
    turns = (("system", "Be brief."), ("user", "hi"), ("assistant", "Hello!"), ("user", "And the sea?"))
    want = ref.greedy(turns, 6, chat=True)
    messages = [{"role": r, "content": c} for r, c in turns]
    messages[0]["role"] = "developer"  # OpenAI's newer name for system
    messages[1]["content"] = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]  # content parts
    r = server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.n_prompt


def test_completion_takes_token_ids(server, ref):
    want = ref.greedy("The quick brown fox", 6)
    r = server.client.completions.create(model=MODEL_ID, prompt=ref.prompt_ids("The quick brown fox", False),
                                         max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == want.n_prompt


def test_stream_is_openai_sse_ending_with_done(server, ref):
    want = ref.greedy("hi there", 5, chat=True)
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5,
         "temperature": 0, "stream": True}))
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_end_the_answer_before_them(server, ref, stream):
    prompt, n = "Once upon a time", 24
    full = ref.greedy(prompt, n)
    # a 3-character stop string from the middle of the greedy answer: the answer is what precedes it
    start = next(i for i in range(len(full.text) // 3, len(full.text) - 3)
                 if full.text[i:i + 3].isprintable() and "\ufffd" not in full.text[i:i + 3])
    stop = full.text[start:start + 3]
    want = full.text[: full.text.find(stop)]
    tokens = next(k for k in range(1, n + 1) if stop in ref.tok.decode(full.ids[:k], skip_special_tokens=True))
    text, finish, usage = _complete(server.client, prompt, n, False, stream=stream, stop=["\u2603never", stop])
    assert (text, finish) == (want, "stop")
    assert usage.completion_tokens == tokens < n


def test_seed_makes_sampling_reproducible(server, ref):
    kw = dict(model=MODEL_ID, prompt="Hello", max_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    a, b = (server.client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b != ref.greedy("Hello", 8).text  # temperature 1.5 on O(1) logits departs from argmax


# ------------------------------------------------------------------------------ bad requests

LONG_PROMPT = "the sea " * 400  # > 512 tokens


def _chat(**kw):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **kw}


def _cmpl(**kw):
    return {"model": MODEL_ID, "prompt": "hi", **kw}


BAD = [  # (path, body, status, error.code or None, message pattern)
    ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model_not_found", "gpt-4o"),
    ("/v1/completions", '{"model": "tiny-qwen3", "prompt": ', 400, None, "not valid JSON"),
    ("/v1/chat/completions", "[1, 2]", 400, None, "object|dictionary"),
    ("/v1/chat/completions", _chat(max_tokens="ten"), 400, None, "max_tokens"),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, None, "temperature"),
    ("/v1/chat/completions", _chat(max_tokens=True), 400, None, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400, None, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, None, "role"),
    ("/v1/completions", {"prompt": "hi"}, 400, None, "model"),
    ("/v1/completions", _cmpl(max_tokens=0), 400, None, "max_tokens"),
    ("/v1/completions", _cmpl(top_p=0), 400, None, "top_p"),
    ("/v1/completions", _cmpl(max_tokens=600), 400, "context_length_exceeded", "max_tokens"),
    ("/v1/completions", _cmpl(prompt=LONG_PROMPT), 400, "context_length_exceeded", "prompt"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400,
     "context_length_exceeded", "prompt"),
    ("/v1/completions", _cmpl(prompt=""), 400, None, "empty"),
    ("/v1/completions", _cmpl(prompt=[5, 999999]), 400, None, "token ids"),
    ("/v1/completions", _cmpl(prompt=["a", "b"]), 400, "unsupported_parameter", "one prompt"),
    ("/v1/chat/completions", _chat(n=2), 400, "unsupported_parameter", "n=2"),
    ("/v1/chat/completions", _chat(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    ("/v1/chat/completions", _chat(presence_penalty=0.5), 400, "unsupported_parameter", "presence_penalty"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "unsupported_parameter", "tools"),
    ("/v1/completions", _cmpl(echo=True), 400, "unsupported_parameter", "echo"),
    ("/v1/chat/completions", _chat(frobnicate=1), 400, "unsupported_parameter", "frobnicate"),
    ("/v1/completions", _cmpl(stop=["a", "b", "c", "d", "e"]), 400, None, "stop"),
    ("/v1/completions", _cmpl(stop=""), 400, None, "stop"),
    ("/v1/nothing", _cmpl(), 404, "not_found", "Not Found"),
]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, ref):
    for path, body, status, code, pattern in BAD:
        got, reply = _raw(server.url, "POST", path, body)
        err = reply.get("error", {})
        assert got == status and set(err) == {"message", "type", "param", "code"}, (path, body, got, reply)
        assert err["code"] == code and re.search(pattern, err["message"]), (body, err)
    # neutral values of the unsupported parameters are what many clients send by default: accepted
    text, _, _ = _complete(server.client, "hi", 3, True, n=1, presence_penalty=0, frequency_penalty=0.0,
                           logit_bias={}, logprobs=False, user="me")
    assert text == ref.greedy("hi", 3, chat=True).text
    h = _idle_health(server)
    assert (h["queued"], h["active"], h["failed"]) == (0, 0, 0)


def test_a_huge_body_is_refused_before_it_is_read(server):
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()  # and no body: the answer must not wait for a terabyte
    r = conn.getresponse()
    assert r.status == 413 and "larger than" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_a_stopped_model_worker_shows_in_health_and_answers(server):
    engine = Engine(server.engine.model, server.engine.tokenizer)
    engine.close()
    with serving(Server(engine, model_id=MODEL_ID)) as url:
        status, body = _raw(url, "GET", "/health")
        assert status == 503 and body["status"] == "model worker stopped"
        status, body = _raw(url, "POST", "/v1/completions", _cmpl(max_tokens=2))
        assert status == 503 and "shutting down" in body["error"]["message"]


def test_the_openai_client_sees_the_errors(server):
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        server.client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError, match="exceeds this model's context") as e:
        server.client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=10_000)
    assert (e.value.code, e.value.param, e.value.type) == ("context_length_exceeded", "max_tokens",
                                                           "invalid_request_error")


# ------------------------------------------------------------------------------ concurrency and cancellation


def test_concurrent_streaming_clients_get_their_single_client_answers(server, ref):
    """16 clients x 2 streamed requests at once, mixed prompts/lengths/kinds: each equals its reference."""
    cases = [(f"Story {i}:" + " once upon a time" * (i % 4), 6 + 3 * (i % 3), i % 2 == 0) for i in range(8)]
    want = {c: ref.greedy(*c).text for c in cases}
    before = _health(server)

    def client_run(k):
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        return [(c, _complete(client, *c, stream=True)) for c in (cases[k % 8], cases[(k + 3) % 8])]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client_run, range(16)) for r in rs]
    assert len(results) == 32
    for (prompt, n, chat), (text, finish, usage) in results:
        assert (text, finish, usage.completion_tokens) == (want[prompt, n, chat], "length", n), (prompt, n, chat)
    after = _idle_health(server)  # a row's stream ends before its batch's generate() returns
    assert (after["queued"], after["active"], after["failed"]) == (0, 0, 0)
    assert after["completed"] - before["completed"] == 32
    assert after["batches"] - before["batches"] < 32  # requests really shared batches


def _wait_idle(server, before, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        h = _health(server)
        if h["cancelled"] > before["cancelled"] and h["active"] == 0 and h["queued"] == 0:
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def test_client_leaving_mid_stream_stops_its_generation(server, ref):
    before = _health(server)
    stream = server.client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=400, temperature=0,
                                              stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    h = _wait_idle(server, before)
    assert h["cancelled"] - before["cancelled"] == 1 and h["completed"] == before["completed"]
    assert h["generated_tokens"] - before["generated_tokens"] < 100  # not the 400 asked for
    text, _, _ = _complete(server.client, "Once", 4, False)  # the slot is free for the next client
    assert text == ref.greedy("Once", 4).text


def test_client_leaving_a_whole_request_stops_its_generation(server):
    before = _health(server)
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(_cmpl(max_tokens=400, temperature=0)),
                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while _health(server)["active"] == 0:  # leave once it is being decoded, however fast this machine is
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.close()
    h = _wait_idle(server, before)
    assert h["cancelled"] - before["cancelled"] == 1 and h["completed"] == before["completed"]


# ------------------------------------------------------------------------------ pieces and the CLI


def test_incremental_text_releases_only_settled_text(ref):
    tok = ref.tok
    text = "Caf\u00e9 \u201cquoted\u201d \u65e5\u672c\u8a9e \U0001f30a waves"
    ids = tok(text).input_ids
    assert len(ids) > len(text) // 2  # the cut vocabulary spells the non-ASCII characters in byte tokens
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    inc = IncrementalText(decode)
    pieces = [inc.add(i)[0] for i in ids]
    assert "".join(pieces) + inc.flush() == decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    inc = IncrementalText(decode, stop=("\u65e5\u672c",))
    out, stopped = "", False
    for i in ids:
        piece, stopped = inc.add(i)
        out += piece
        if stopped:
            break
    assert stopped and out == inc.text == text[: text.find("\u65e5")]


def test_cli_serve_errors_are_clear(tmp_path, capsys):
    from ferrum_mps.cli import main

    assert main(["serve", "--model", str(tmp_path / "none.gguf"), "--port", "0"]) == 1
    assert "no GGUF file" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gguf = tmp_path / "x.gguf"
        gguf.write_bytes(b"GGUF")  # never read: the taken port fails first
        assert main(["serve", "--model", str(gguf), "--port", str(taken.getsockname()[1])]) == 1
    assert "in use" in capsys.readouterr().err


def test_cli_serve_with_api_key(gguf_path, ref):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "ferrum_mps", "serve", "--model", str(gguf_path), "--port", "0",
                             "--device", "cpu", "--api-key", "sekrit", "--max-batch", "2",
                             "--default-max-tokens", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # stderr is read on a thread (and kept drained), so a server stuck before its banner fails
        # the test after 180 s instead of blocking it until pytest's timeout
        lines, banner = [], queue.Queue()

        def drain():
            for line in proc.stderr:
                lines.append(line)
                if m := re.search(r"on (http://127\.0\.0\.1:\d+/v1) \(cpu", line):
                    banner.put(m[1])
            banner.put(None)  # stderr closed: the process is gone

        threading.Thread(target=drain, daemon=True).start()
        try:
            url = banner.get(timeout=180)
        except queue.Empty:
            url = None
        if url is None:
            pytest.fail("the server did not start:\n" + "".join(lines)[-3000:])
        assert _raw(url, "GET", "/health")[0] == 200  # health needs no key (for monitors)
        status, body = _raw(url, "GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert _raw(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [gguf_path.stem]
        r = client.chat.completions.create(model=gguf_path.stem, messages=[{"role": "user", "content": "hi there"}],
                                           temperature=0)  # no max_tokens: --default-max-tokens 5
        assert r.choices[0].message.content == ref.greedy("hi there", 5, chat=True).text
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (5, "length")
    finally:
        proc.terminate()
        proc.wait(30)  # uvicorn shuts down, then re-raises SIGTERM: the exit status says -15
