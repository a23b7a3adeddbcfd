"""`serve` throughput: requests/s and tokens/s for 1, 4 and 16 concurrent clients, queue vs batched.

One in-process server on a free loopback port; each client is a thread with its own official
`openai` client sending streamed greedy completions back to back. Every client count runs twice
in the same process, side by side: with --max-batch 1 (a plain request queue, one request decoded
at a time) and with batching (queued requests decoded together as one left-padded batch), and the
ratio batched/queue is printed. The two modes alternate --repeats times and the best run of each
is kept (a shared machine's load swings more than the effect). With one client both modes run the
same code, so that row's ratio shows the noise.

    python benchmarks/bench_serve.py                            # tiny synthetic Qwen3, CPU
    python benchmarks/bench_serve.py --model gemma --tokens 32  # the embedded Gemma-3-270M
    python benchmarks/bench_serve.py --model FILE.gguf --device mps
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time


def _path(name: str):
    if name == "tiny":
        from ferrum_mps.testing.synthetic import synthetic_gguf, tiny_config

        return synthetic_gguf(tiny_config("qwen3"), qtypes="q8_0").path
    if name == "gemma":
        from ferrum_mps.default_model import default_model_path

        return default_model_path()
    return name


def _client_run(url: str, model_id: str, k: int, requests: int, tokens: int):
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    done, first_token = 0, []
    for r in range(requests):
        t0 = time.perf_counter()
        stream = client.completions.create(model=model_id, prompt=f"Request {r} of client {k}: once upon a time",
                                           max_tokens=tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and len(first_token) == r:
                first_token.append(time.perf_counter() - t0)
            if chunk.usage is not None:
                done += chunk.usage.completion_tokens
    return done, first_token


def _phase(url, model_id, clients, requests, tokens):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda k: _client_run(url, model_id, k, requests, tokens), range(clients)))
    wall = time.perf_counter() - t0
    n_tokens = sum(r[0] for r in results)
    ttft = sorted(t for r in results for t in r[1])
    return {"req_s": clients * requests / wall, "tok_s": n_tokens / wall, "ttft_p50": ttft[len(ttft) // 2],
            "wall": wall, "tokens": n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (synthetic Qwen3, default), gemma, or a .gguf path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--max-batch", type=int, default=16, help="batch size of the batched runs (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode, best kept (default 3)")
    args = ap.parse_args()

    from pathlib import Path

    from ferrum_mps import load_model, load_tokenizer
    from ferrum_mps.server import serving
    from ferrum_mps.server.api import Server
    from ferrum_mps.server.engine import Engine

    path = _path(args.model)
    model, tok = load_model(path, device=args.device, progress=False), load_tokenizer(path)
    engine = Engine(model, tok, max_batch=1)
    model_id = Path(path).stem
    print(f"model {Path(path).name} on {args.device}; {args.requests} streamed greedy requests of {args.tokens} "
          f"tokens per client")
    try:
        with serving(Server(engine, model_id)) as url:
            _phase(url, model_id, 1, 1, 4)  # warm-up
            print(f"{'clients':>7} {'mode':>10} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'wall s':>7}"
                  f" {'batched/queue':>14}")
            modes = (("queue", 1), (f"batch<={args.max_batch}", args.max_batch))
            for clients in (int(c) for c in args.clients.split(",")):
                best = {}
                for _ in range(args.repeats):
                    for mode, max_batch in modes:
                        engine.max_batch = max_batch
                        r = _phase(url, model_id, clients, args.requests, args.tokens)
                        assert r["tokens"] == clients * args.requests * args.tokens, r  # every request complete
                        if mode not in best or r["tok_s"] > best[mode]["tok_s"]:
                            best[mode] = r
                for mode, max_batch in modes:
                    r = best[mode]
                    ratio = "" if max_batch == 1 else f"{r['tok_s'] / best['queue']['tok_s']:.2f}x"
                    print(f"{clients:>7} {mode:>10} {r['req_s']:>8.2f} {r['tok_s']:>8.1f} {r['ttft_p50']:>8.2f}s"
                          f" {r['wall']:>7.1f} {ratio:>14}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
