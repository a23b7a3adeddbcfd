"""Where a CPU decode token goes: the native plan's steps by kind, the lm_head, the embedding, the
Python around them and what transformers' generate() adds per token.

    python benchmarks/bench_cpu_token.py                      # the embedded Gemma-3-270M
    python benchmarks/bench_cpu_token.py --model FILE.gguf --threads 1

Each plan step is timed alone (run again at the same cache slot: same work, same bytes), so the
per-kind sums add up to about the plan's time; the total rows are timed as a whole.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def _time(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded Gemma-3-270M)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--context", type=int, default=64, help="tokens in the cache when the token is timed")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    from ferrum_mps import load_model, native
    from ferrum_mps.default_model import default_model_path
    from ferrum_mps.models import native_plan

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model or default_model_path(), device="cpu", progress=False)
    ids = torch.randint(3, 1000, (1, a.context), generator=torch.Generator().manual_seed(0))
    tok = ids[:, -1:]
    cache = model.static_cache(1, a.context + 2 * a.reps + 16)
    rows: dict[str, float] = {}
    with torch.inference_mode(), native.owning_threads():
        model(ids, past_key_values=cache)
        model(tok, past_key_values=cache)  # builds the plan
        plan = native_plan.latest(model)
        if plan is None:
            raise SystemExit("no native plan for this model (native kernels off or unsupported layers)")
        slot = cache.seen
        rows["forward (one token)"] = _time(lambda: model(tok, past_key_values=cache, cache_position=torch.tensor([slot])), a.reps)
        h = model._embed(tok, None)
        rows["  embedding"] = _time(lambda: model._embed(tok, None), a.reps)
        rows["  plan (one native call)"] = _time(lambda: plan.run(h, slot, slot), a.reps)
        lib, table = native._load(), plan.plan._table
        names = {code: name for name, (code, _, _) in native.plan_layout()[0].items()}
        by_kind: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for i in range(table.shape[0]):
            kind = names[int(table[i, 0])]
            ptr = table[i:].data_ptr()
            by_kind[kind] += _time(lambda: lib.fm_plan_run(ptr, 1, slot, slot, native.threads()), a.reps)
            counts[kind] += 1
        for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            rows[f"    {kind} x{counts[kind]}"] = t
        out = plan.out.view(1, 1, -1)
        rows["  lm_head"] = _time(lambda: model.lm_head(out), a.reps)
        rows["  rest of forward (Python, checks)"] = (rows["forward (one token)"] - rows["  embedding"]
                                                      - rows["  plan (one native call)"] - rows["  lm_head"])
    kw = dict(max_new_tokens=a.reps + 1, eos_token_id=None, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)
        t0 = time.perf_counter()
        model.generate(ids[:, :1], max_new_tokens=1, do_sample=False, pad_token_id=0)
        short = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids[:, :1], **kw)
        per_token = (time.perf_counter() - t0 - short) / a.reps
    rows["generate() per token"] = per_token
    rows["  generate() around forward (sampling, bookkeeping)"] = per_token - rows["forward (one token)"]
    print(f"{native.threads()} native threads, isa {native.status()['isa']}, context {a.context}")
    for name, t in rows.items():
        print(f"{name:<52}{t * 1e3:>9.3f} ms")


if __name__ == "__main__":
    main()
