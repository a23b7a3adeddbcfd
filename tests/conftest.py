import pytest
import torch

import ferrum_mps.metal as metal
from ferrum_mps import native

# The MPS path always runs under the Metal-on-CPU harness; on a Mac it runs on the GPU too.
METAL_BACKENDS = ["metal_sim"] + (["mps"] if torch.backends.mps.is_available() else [])


@pytest.fixture(params=METAL_BACKENDS)
def metal_device(request):
    """Device to put tensors on while ferrum's MPS implementations compile with the matching compiler."""
    if request.param == "mps":
        with metal.use_shader_compiler(torch.mps.compile_shader):
            yield torch.device("mps")
    else:
        from ferrum_mps.testing.metal_sim import compile_shader

        with metal.use_shader_compiler(compile_shader):
            yield torch.device("cpu")


@pytest.fixture(scope="session")
def gemma_gguf_path():
    """The real Gemma-3-270M Q4_K_M GGUF made by llama.cpp (Q4_K, Q6_K, Q5_0, Q8_0, F32 tensors)."""
    from ferrum_mps.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma_reader_summary(gemma_gguf_path):
    """What gguf-py's own GGUFReader (the independent reference) says about the Gemma file.

    The stock reader takes 20-50 s and ~700 MB on Gemma's 262k-token vocabulary, so it is
    read once per session and only its tensor table and metadata are kept.
    """
    import gguf

    ref = gguf.GGUFReader(gemma_gguf_path)
    tensors = [
        (t.name, gguf.GGMLQuantizationType(t.tensor_type), tuple(int(d) for d in t.shape.tolist()),
         int(t.n_elements), int(t.n_bytes), int(t.data_offset))
        for t in ref.tensors
    ]
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    return {"tensors": tensors, "fields": fields}


@pytest.fixture(autouse=True)
def _exact_cpu_path(request):
    """Tests compare CPU ops with float references at ~1e-5, so they run the exact float path;
    tests marked `native` run the native CPU kernels (int8 activations, ~5e-3 relative) instead."""
    if request.node.get_closest_marker("native"):
        yield
        return
    before = native.set_enabled(False)  # process-wide: threads a test starts (a server's) follow it too
    try:
        yield
    finally:
        native.set_enabled(before)
