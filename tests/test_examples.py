"""Smoke test of the examples: drop_in_moe.py runs and reports agreement with transformers."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_drop_in_moe_agrees_with_transformers():
    r = subprocess.run([sys.executable, str(EXAMPLES / "drop_in_moe.py")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "FusedMoE(" in out and "QuantLinear(" in out  # the modules were really swapped in
    diff = float(re.search(r"same dequantized blocks\| = (\S+)", out).group(1))
    quant_err = float(re.search(r"original float model\| = (\S+)", out).group(1))
    assert diff < 1e-3
    assert quant_err > 10 * max(diff, 1e-6)  # the swapped model really runs on quantized weights
    assert "greedy tokens identical: True" in out
    assert out.strip().endswith("AGREE")
