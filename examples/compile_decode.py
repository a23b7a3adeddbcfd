"""torch.compile(fullgraph=True) on the decode step, with a static KV cache: speedup vs eager.

    python examples/compile_decode.py                          # a small synthetic Qwen3-MoE (fast)
    python examples/compile_decode.py --model model.gguf --tokens 32

Prefill runs eagerly into a preallocated cache; then the same greedy decode runs eagerly and
compiled, and the two must pick the same tokens.
"""

import argparse
import time

import torch

import ferrum_mps
from ferrum_mps.testing.synthetic import synthetic_gguf

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a .gguf file (default: a small synthetic Qwen3-MoE, written once)")
parser.add_argument("--tokens", type=int, default=16, help="decode steps to time")
args = parser.parse_args()

path = args.model or synthetic_gguf("qwen3moe").path
model = ferrum_mps.load_model(path, progress=False)
dev = model.device
prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=dev) % model.config.vocab_size
max_len = prompt.shape[1] + args.tokens + 1
cache = model.static_cache(1, max_len)


def step(ids, pos):
    return model(input_ids=ids, past_key_values=cache, cache_position=pos).logits[:, -1]


def decode(fn, n):
    """Greedy tokens and seconds per token after an eager prefill (the clock starts after the first step)."""
    with torch.inference_mode():
        logits = model(input_ids=prompt, past_key_values=cache,
                       cache_position=torch.arange(prompt.shape[1], device=dev)).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        tokens = [tok.item()]
        t0 = None
        for i in range(n):
            pos = torch.tensor([prompt.shape[1] + i], device=dev)
            tok = fn(tok, pos).argmax(-1, keepdim=True)
            tokens.append(tok.item())  # .item() syncs: the clock measures finished work
            if t0 is None:
                t0 = time.perf_counter()  # the first step may compile: not timed
        return tokens, (time.perf_counter() - t0) / max(n - 1, 1)


eager_tokens, eager_s = decode(step, args.tokens)
t0 = time.perf_counter()
compiled = torch.compile(step, fullgraph=True, dynamic=False)
decode(compiled, 2)  # compile + warm up
compile_s = time.perf_counter() - t0
compiled_tokens, compiled_s = decode(compiled, args.tokens)

print(f"model: {path} on {dev}")
print(f"eager:    {1 / eager_s:8.1f} tokens/s")
print(f"compiled: {1 / compiled_s:8.1f} tokens/s  (compile {compile_s:.1f} s, fullgraph=True)")
print(f"speedup:  {eager_s / compiled_s:.2f}x; same tokens: {eager_tokens == compiled_tokens}")
