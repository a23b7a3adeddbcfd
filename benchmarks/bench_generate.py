"""Generation benchmark: ferrum-mps vs transformers loading the same GGUF file, side by side.

For each model and implementation, in a fresh subprocess (so resident memory is that model's
alone): load time, resident memory added by the load (RSS delta), prefill tokens/s on the same
prompt ids, and greedy decode tokens/s.

    python benchmarks/bench_generate.py                        # CPU here; MPS too when present
    python benchmarks/bench_generate.py --models gemma --decode 8

Models:
  gemma        the embedded Gemma-3-270M Q4_K_M (a real llama.cpp file)
  qwen3moe-a3b a synthetic Qwen3-MoE with Qwen3-30B-A3B's layer dimensions (hidden 2048, 32/4 heads
               of 128, 128 experts top-8, expert width 768), 2 layers, small vocabulary (1,027:
               a 151k-row lm_head would dominate a 2-layer model), Q4_K/Q6_K as in Q4_K_M files.
               Written once under ~/.cache/ferrum_mps/synthetic; its 2-D weights repeat their first
               1,024 rows and its experts repeat the first 4 (same sizes and compute; K-quant search
               on 1.2 B random weights would take hours). `--moe-gguf FILE` uses another file of these
               dimensions instead, e.g. the real-vocabulary one llama-quantize makes
               (benchmarks/make_a3b_gguf.py).
transformers dequantizes the file to float32 at load (its only GGUF path without a GPU kernel).

With `--llama-bench PATH` (a llama.cpp build's llama-bench), llama.cpp runs on the same file with the
same thread count, prompt length and decode length, and the table adds ferrum/llama.cpp ratios.
`--rounds N` alternates the implementations N times and reports each one's median (a shared machine's
load moves both alike). Example, the issue's figures:

    python benchmarks/bench_generate.py --models gemma --impls ferrum --llama-bench .../llama-bench \
        --threads 2 --prompt 64 --decode 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODELS = ("gemma", "qwen3moe-a3b")
IMPLS = ("ferrum", "ferrum-float", "transformers", "llama.cpp")  # ferrum-float: native CPU kernels off (exact float path)


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model_path(name: str, moe_gguf: str | None = None):
    if name == "gemma":
        from ferrum_mps.default_model import default_model_path

        return default_model_path(), None
    from pathlib import Path

    from ferrum_mps.testing import synthetic as S

    if moe_gguf:  # a file written earlier (the cache key follows quants.py, which may have changed since)
        return Path(moe_gguf), S.qwen3_30b_a3b_config(2, full_vocab=False)
    m = S.synthetic_gguf(S.qwen3_30b_a3b_config(2, full_vocab=False), unique_rows=1024, unique_experts=4,
                         progress=True)
    return m.path, m.config


class _Clock:
    """A generate() streamer that only time-stamps: the first put is the prompt, the rest new tokens."""

    def __init__(self):
        self.start, self.times = None, []

    def put(self, value):
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        else:
            self.times.append(now)

    def end(self):
        pass


def worker(name: str, impl: str, device: str, prompt_len: int, decode: int, threads: int | None,
           moe_gguf: str | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    path, config = _model_path(name, moe_gguf)
    rss0 = _rss()
    t0 = time.perf_counter()
    if impl.startswith("ferrum"):
        import ferrum_mps
        from ferrum_mps import native

        native.set_enabled(impl == "ferrum")
        model = ferrum_mps.load_model(path, device=device, dtype=torch.float32, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        kw = {"config": config} if config is not None else {}  # 5.23 ignores expert_feed_forward_length
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     **kw).to(device).eval()
    if device == "mps":
        torch.mps.synchronize()
    load_s = time.perf_counter() - t0
    rss = _rss() - rss0
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    clock = _Clock()
    with torch.inference_mode():
        # One untimed short generate first, as llama-bench's warmup run: the first touch of mmap'ed
        # weights (page faults over the whole file, ~0.2 s for 1.1 GB) is load cost, not prefill.
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, eos_token_id=None,
                       do_sample=False, pad_token_id=0)
        # eos_token_id=None: a fixed number of tokens, as llama-bench. min_new_tokens did the same through
        # a logits processor that builds a vocabulary-sized mask every step (arange + isin + where over
        # Gemma's 262,144 ids): ~4 ms of a ~24 ms CPU token, measured with torch.profiler.
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode + 1,
                             eos_token_id=None, do_sample=False, streamer=clock, pad_token_id=0)
    rss_after = _rss() - rss0  # mmap'ed weights count once generation has touched them
    prefill_s = clock.times[0] - clock.start
    decode_s = clock.times[-1] - clock.times[0]
    return {"model": name, "impl": impl, "device": device, "file_mb": path.stat().st_size / 2**20,
            "load_s": load_s, "rss_mb": rss / 2**20, "rss_gen_mb": rss_after / 2**20, "prefill_tps": prompt_len / prefill_s,
            "decode_tps": decode / decode_s, "tokens": out[0, prompt_len:].tolist()}


def llama_bench(binary: str, name: str, path, prompt: int, decode: int, threads: int) -> dict:
    """llama.cpp's own benchmark on the same file: prompt processing of `prompt` tokens and generation of
    `decode` tokens, 3 repetitions each (llama-bench's averages)."""
    cmd = [binary, "-m", str(path), "-p", str(prompt), "-n", str(decode), "-t", str(threads), "-r", "3", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tests = json.loads(r.stdout)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] == decode and t["n_prompt"] == 0)
    nan = float("nan")
    return {"model": name, "impl": "llama.cpp", "device": "cpu", "file_mb": path.stat().st_size / 2**20, "load_s": nan,
            "rss_mb": nan, "rss_gen_mb": nan, "prefill_tps": pp, "decode_tps": tg, "tokens": None}


def _median(rows: list[dict]) -> dict:
    """The run with the median decode speed, its prefill speed replaced by the median prefill speed."""
    by_decode = sorted(rows, key=lambda r: r["decode_tps"])
    out = dict(by_decode[len(rows) // 2])
    out["prefill_tps"] = sorted(r["prefill_tps"] for r in rows)[len(rows) // 2]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and mps when available")
    p.add_argument("--prompt", type=int, default=64, help="prompt length in tokens (same ids for both)")
    p.add_argument("--decode", type=int, default=16, help="decode steps timed (after the first new token)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=["ferrum", "transformers"])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--moe-gguf", help="use this already written qwen3moe-a3b file instead of the cached one")
    p.add_argument("--llama-bench", help="a llama.cpp llama-bench binary: adds llama.cpp on the same files (CPU)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the implementations this many times; report medians")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker, a.prompt, a.decode, a.threads, a.moe_gguf)))
        return
    import torch

    devices = a.devices or (["cpu"] + (["mps"] if torch.backends.mps.is_available() else []))
    threads = a.threads or torch.get_num_threads()
    runs: dict[tuple, list[dict]] = {}
    for name in a.models:
        path, _ = _model_path(name, a.moe_gguf)  # write / assemble the file once, before any timing
        for _ in range(a.rounds):
            for device in devices:
                for impl in [i for i in a.impls if i != "llama.cpp"] + (["llama.cpp"] if a.llama_bench and device == "cpu" else []):
                    if impl == "llama.cpp":
                        row = llama_bench(a.llama_bench, name, path, a.prompt, a.decode, threads)
                    else:
                        cmd = [sys.executable, __file__, "--worker", name, impl, device, "--prompt", str(a.prompt),
                               "--decode", str(a.decode), "--threads", str(threads)]
                        cmd += ["--moe-gguf", a.moe_gguf] if a.moe_gguf else []
                        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                        if r.returncode != 0:
                            print(f"{name} {impl} {device}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
                            continue
                        row = json.loads(r.stdout.strip().splitlines()[-1])
                    runs.setdefault((name, device, impl), []).append(row)
                    print(f"  {name} {impl} {device}: prefill {row['prefill_tps']:.1f} tok/s, decode {row['decode_tps']:.2f} tok/s",
                          file=sys.stderr, flush=True)
    rows = [_median(rs) for rs in runs.values()]
    print(f"\n{threads} threads, {a.rounds} round(s), medians; machine: {platform.machine()}, {os.cpu_count()} CPUs")
    _table(rows, a.prompt, a.decode)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


def _table(rows: list[dict], prompt: int, decode: int) -> None:
    print(f"\nprompt {prompt} tokens (same ids for both), greedy decode {decode} tokens; float32 activations")
    head = f"{'model':<14}{'device':<7}{'impl':<14}{'file MB':>9}{'load s':>9}{'RSS +MB':>10}{'after gen':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
    print(head)
    print("-" * len(head))
    by = {(r["model"], r["device"], r["impl"]): r for r in rows}
    for (model, device) in dict.fromkeys((r["model"], r["device"]) for r in rows):
        for impl in IMPLS:
            r = by.get((model, device, impl))
            if r:
                print(f"{model:<14}{device:<7}{impl:<14}{r['file_mb']:>9.0f}{r['load_s']:>9.2f}{r['rss_mb']:>10.0f}{r['rss_gen_mb']:>10.0f}"
                      f"{r['prefill_tps']:>15.1f}{r['decode_tps']:>14.2f}")
        f, t = by.get((model, device, "ferrum")), by.get((model, device, "transformers"))
        if f and t:
            same = f["tokens"] == t["tokens"]
            print(f"{'':<14}{device:<7}{'ferrum/hf':<14}{'':>9}{f['load_s'] / t['load_s']:>8.2f}x"
                  f"{f['rss_mb'] / max(t['rss_mb'], 1):>9.2f}x{f['rss_gen_mb'] / max(t['rss_gen_mb'], 1):>9.2f}x"
                  f"{f['prefill_tps'] / t['prefill_tps']:>14.2f}x"
                  f"{f['decode_tps'] / t['decode_tps']:>13.2f}x   same greedy tokens: {same}")
        ll = by.get((model, device, "llama.cpp"))
        if f and ll:
            print(f"{'':<14}{device:<7}{'ferrum/llama':<14}{'':>38}{f['prefill_tps'] / ll['prefill_tps']:>14.2f}x"
                  f"{f['decode_tps'] / ll['decode_tps']:>13.2f}x")


if __name__ == "__main__":
    main()
