"""The MPS implementations of the ferrum ops, as plain functions named after their op.

They are registered as the ops' MPS kernels; called on CPU tensors under a
harness compiler (`use_shader_compiler(ferrum_mps.testing.metal_sim.compile_shader)`)
they run the same launch code, grid sizes and validation that run on a Mac.
"""

from .shaders import get_shader_compiler, set_shader_compiler, use_shader_compiler  # noqa: F401
from .ops.linear import dequantize_mps as dequantize  # noqa: F401,E402
from .ops.linear import qembedding_mps as qembedding  # noqa: F401,E402
from .ops.linear import qlinear_mps as qlinear  # noqa: F401,E402
from .ops.moe import moe_ffn_mps as moe_ffn  # noqa: F401,E402
from .ops.moe import moe_qlinear_mps as moe_qlinear  # noqa: F401,E402
from .ops.moe import moe_route_mps as moe_route  # noqa: F401,E402
from .ops.attention import decode_attention_mps as decode_attention  # noqa: F401,E402
from .ops.fused_linear import gate_up_act_mps as gate_up_act  # noqa: F401,E402
from .ops.fused_linear import qkv_linear_mps as qkv_linear  # noqa: F401,E402
from .ops.norm import add_rms_norm_mps as add_rms_norm  # noqa: F401,E402
from .ops.norm import moe_gate_route_mps as moe_gate_route  # noqa: F401,E402
from .ops.norm import qk_norm_rope_cache_mps as qk_norm_rope_cache  # noqa: F401,E402
from .ops.norm import rms_norm_mps as rms_norm  # noqa: F401,E402
