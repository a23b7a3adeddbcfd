"""`python -m ferrum_mps generate`: the sub-command's arguments and what it runs (ferrum_mps.generation
does the generating)."""

from __future__ import annotations

import argparse
import sys
import time

from .generation import check_sampling, encode_prompt, generate_text

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"
DEFAULT_CHAT_PROMPT = "Write a short poem about the sea."


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text from a GGUF model, streaming tokens as they come",
                              description="Generate text from a GGUF model. Without --model, runs the embedded "
                                          "default (Gemma-3-270M Q4_K_M assembled from its PyPI packages).")
    p.add_argument("--model", help="path of a .gguf file (default: the embedded Gemma-3-270M Q4_K_M)")
    p.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r}, or with --chat {DEFAULT_CHAT_PROMPT!r})")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", default=None, help="mps or cpu (default: mps when available)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args) -> int:
    """Load, stream the continuation to stdout, print load time and speeds to stderr."""
    from ferrum_mps.loading import load_model, load_tokenizer, resolve_device

    if args.model is None:
        from ferrum_mps.default_model import default_model_path

        try:
            path = default_model_path()
        except RuntimeError as e:  # not installed: the CLI reports OSErrors as clean errors
            raise OSError(str(e)) from e
    else:
        path = args.model
    prompt = args.prompt if args.prompt is not None else (DEFAULT_CHAT_PROMPT if args.chat else DEFAULT_PROMPT)
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(path)
    if args.chat:
        encode_prompt(tokenizer, prompt, chat=True)  # no chat template: fail before the long part
    model = load_model(path, device=device)
    load_s = time.perf_counter() - t0
    if not args.chat:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    r = generate_text(model, tokenizer, prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=sys.stdout)
    if not r.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"load: {load_s:.2f} s ({path}, {model.device})", file=sys.stderr)
    print(f"prefill: {r.prompt_tokens} tokens, {r.prefill_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    print(f"decode: {r.new_tokens} tokens, {r.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0
