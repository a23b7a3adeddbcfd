"""Write the Qwen3-30B-A3B-dims benchmark file the way a real Q4_K_M file is made: a random 2-layer
Qwen3-MoE with 30B-A3B's layer dimensions and the real 151,936-token Qwen vocabulary, written as
convert_hf_to_gguf.py writes a 16-bit model (2-D weights F16; norms and the router F32), then
quantized by llama.cpp's own llama-quantize to Q4_K_M (Q4_K, with Q6_K where llama.cpp puts it).

    python benchmarks/make_a3b_gguf.py --llama-quantize .../llama-quantize --out /tmp/a3b-q4_k_m.gguf
    python benchmarks/bench_generate.py --models qwen3moe-a3b --moe-gguf /tmp/a3b-q4_k_m.gguf \\
        --llama-bench .../llama-bench --threads 2 --prompt 19

Measured here: 27 s to write the 3.7 GB F16 file, 53 s to quantize it (2 threads), 1.19 GB out.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from ferrum_mps.testing import synthetic as S


def f16_policy(name: str, shape: tuple) -> Q:
    """convert_hf_to_gguf.py's choice for a 16-bit model: norms, biases and ffn_gate_inp in F32."""
    return Q.F32 if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") else Q.F16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-quantize", required=True, help="a llama.cpp build's llama-quantize binary")
    p.add_argument("--out", required=True, type=Path, help="the Q4_K_M file to write")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    f16 = a.out.with_name(a.out.stem + "-f16.gguf")
    t = time.perf_counter()
    S.write_gguf(f16, S.qwen3_30b_a3b_config(a.layers, full_vocab=True), qtypes=f16_policy, progress=True)
    print(f"wrote {f16} in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    subprocess.run([a.llama_quantize, str(f16), str(a.out), "Q4_K_M", str(a.threads)], check=True)
    print(f"quantized to {a.out} ({a.out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    f16.unlink()


if __name__ == "__main__":
    main()
