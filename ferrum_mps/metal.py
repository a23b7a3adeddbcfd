"""The MPS implementations of the ferrum ops, as plain functions named after their op.

They are registered as the ops' MPS kernels; called on CPU tensors under a
harness compiler (`use_shader_compiler(ferrum_mps.testing.metal_sim.compile_shader)`)
they run the same launch code, grid sizes and validation that run on a Mac.
"""

from .shaders import get_shader_compiler, set_shader_compiler, use_shader_compiler  # noqa: F401
