"""Generate text from a GGUF model with Hugging Face's generate(), streaming tokens as they come.

    python examples/generate.py                        # the embedded Gemma-3-270M Q4_K_M
    python examples/generate.py --model Qwen3-30B-A3B-Q4_K_M.gguf --prompt "Why is the sky blue?"
"""

import argparse
import time

import torch
from transformers import TextStreamer

import ferrum_mps
from ferrum_mps.default_model import default_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a .gguf file (default: the embedded Gemma-3-270M Q4_K_M)")
parser.add_argument("--prompt", default="The three most important inventions of the last century are")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

path = args.model or default_model_path()
t0 = time.perf_counter()
model = ferrum_mps.load_model(path)  # mps when available; weights stay raw quantized bytes
tok = ferrum_mps.load_tokenizer(path)  # transformers tokenizer rebuilt from the GGUF metadata
print(f"loaded {path} on {model.device} in {time.perf_counter() - t0:.1f} s")

inputs = tok(args.prompt, return_tensors="pt").to(model.device)
t0 = time.perf_counter()
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                         streamer=TextStreamer(tok, skip_prompt=False))
n = out.shape[1] - inputs.input_ids.shape[1]
print(f"{n} tokens in {time.perf_counter() - t0:.1f} s")
