"""generate() with a torch.compile'd decode step: speedup vs eager, same tokens.

    python examples/compile_decode.py                          # a small synthetic Qwen3-MoE (fast)
    python examples/compile_decode.py --model model.gguf --tokens 32

model.generate() decodes on a StaticCache (K/V preallocated for prompt + max_new_tokens and
written in place). After `model.compile_decode()` each of its one-token steps runs
`torch.compile(model.decode_step, fullgraph=True)`: one graph per step, prefill stays eager.
The first compiled generate() pays for compiling; later calls of the same shapes reuse the graph.
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
prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=model.device) % model.config.vocab_size


class Clock:
    """A generate() streamer that only time-stamps: the first put is the prompt, the rest new tokens."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode(n):
    """Greedy tokens and seconds per decode step (prefill and the first step are not timed)."""
    clock = Clock()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=n + 2, min_new_tokens=n + 2, do_sample=False, streamer=clock)
    t = clock.times[2:]  # [prompt, first token (prefill), second token (first step: may compile), ...]
    return out[0, prompt.shape[1]:].tolist(), (t[-1] - t[0]) / max(len(t) - 1, 1)


eager_tokens, eager_s = decode(args.tokens)
model.compile_decode()
t0 = time.perf_counter()
decode(args.tokens)  # compile + warm up (same prompt and length: same cache shape, same graph)
compile_s = time.perf_counter() - t0
compiled_tokens, compiled_s = decode(args.tokens)

print(f"model: {path} on {model.device}")
print(f"eager:    {1 / eager_s:8.1f} tokens/s")
print(f"compiled: {1 / compiled_s:8.1f} tokens/s  (compile {compile_s:.1f} s, fullgraph=True)")
print(f"speedup:  {eager_s / compiled_s:.2f}x; same tokens: {eager_tokens == compiled_tokens}")
