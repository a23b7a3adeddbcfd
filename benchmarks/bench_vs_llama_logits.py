"""Logits of ferrum's native CPU kernels against llama.cpp's own on the same GGUF file.

Both quantize activations to int8 (llama.cpp's scheme), so neither equals the exact float model;
this prints, teacher-forced over one token sequence, how far each is from ferrum's exact float path
(`native.disabled()`, which matches transformers to ~2e-3 in the tests) and from each other: max
|logit| difference, mean KL(exact || other), top-1 agreement.

    pip install llama-cpp-python            # or: --llama-cpp-path DIR with a built llama_cpp package
    python benchmarks/bench_vs_llama_logits.py                  # the embedded Gemma-3-270M
    python benchmarks/bench_vs_llama_logits.py --model FILE.gguf --tokens 128
"""

from __future__ import annotations

import argparse
import sys

import torch


def _stats(ref: torch.Tensor, other: torch.Tensor) -> str:
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == other.argmax(-1)).float().mean().item()
    return f"max |d logit| {(ref - other).abs().max().item():7.3f}   mean KL {kl:.2e}   top-1 agree {100 * top1:5.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded Gemma-3-270M)")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp-path", help="a directory holding the llama_cpp package (put first on sys.path)")
    a = p.parse_args()
    if a.llama_cpp_path:
        sys.path.insert(0, a.llama_cpp_path)
    import llama_cpp

    from ferrum_mps import load_model, native
    from ferrum_mps.default_model import default_model_path
    from ferrum_mps.loading import load_tokenizer

    path = str(a.model or default_model_path())
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(path)
    text = open(__file__.replace("benchmarks/bench_vs_llama_logits.py", "README.md")).read()
    ids = tok(text, return_tensors="pt").input_ids[:, : a.tokens]
    model = load_model(path, device="cpu", progress=False)
    with torch.inference_mode():
        with native.disabled():
            exact = model(ids).logits[0].float()
        prefill = model(ids).logits[0].float()  # native kernels, the op path (many rows per call)
        cache = model.static_cache(1, ids.shape[1])
        decode = torch.cat([model(ids[:, i : i + 1], past_key_values=cache).logits[0] for i in range(ids.shape[1])])
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, ids.shape[1]), n_threads=a.threads, logits_all=True,
                          verbose=False)
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(llm.scores[: ids.shape[1]], dtype=torch.float32)
    print(f"{path}: {ids.shape[1]} tokens of README.md, teacher-forced; native isa {native.status()['isa']}")
    print(f"  ferrum native prefill vs exact  {_stats(exact, prefill)}")
    print(f"  ferrum native decode  vs exact  {_stats(exact, decode)}")
    print(f"  llama.cpp             vs exact  {_stats(exact, theirs)}")
    print(f"  ferrum native decode  vs llama  {_stats(theirs, decode)}")
    print(f"  decode == prefill bit for bit: {torch.equal(decode, prefill)}")


if __name__ == "__main__":
    main()
