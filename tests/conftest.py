import pytest
import torch

import ferrum_mps.metal as metal

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
