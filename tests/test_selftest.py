"""`python -m ferrum_mps selftest`: passes on healthy kernels (under the Metal-on-CPU harness), fails on a broken one."""

import io
import os
import subprocess
import sys

import pytest

from ferrum_mps import selftest
from ferrum_mps.cli import build_parser


def test_quick_selftest_passes_under_the_harness():
    r = subprocess.run([sys.executable, "-m", "ferrum_mps", "selftest", "--quick", "--harness"],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "Metal-on-CPU harness" in lines[0]
    quick = selftest.select(selftest.CHECKS, quick=True, pattern=None)
    passed = [ln for ln in lines if ln.startswith("PASS  ")]
    assert [ln.split()[1:-5] for ln in passed] == [c.name.split() for c in quick]
    # every op of the full table is in the quick set
    families = {c.name.split()[0] for c in quick}
    assert families == {c.name.split()[0] for c in selftest.CHECKS}
    assert {"dequantize", "qlinear", "qembedding", "moe_route", "moe_qlinear", "moe_ffn"} <= families
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    assert f"{len(quick)} of {len(quick)} checks passed, 0 failed" in r.stdout
    assert "bandwidth: skipped" in r.stdout


def test_a_corrupted_kernel_fails_the_selftest():
    from ferrum_mps.testing.metal_sim import compile_shader

    good, bad = "w[i] = d * float(q - 8);", "w[i] = d * float(q - 7);"  # Q4_0's dequantizer off by one code

    def corrupting(source):
        assert good in source, "quant_blocks.h changed: update the line this test corrupts"
        return compile_shader(source.replace(good, bad))

    out = io.StringIO()
    args = build_parser().parse_args(["selftest", "--harness", "-k", "dequantize Q4_0"])
    assert selftest.run(args, out=out, compiler=corrupting) == 1
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 3 and all(ln.startswith("FAIL  dequantize Q4_0") for ln in lines), out.getvalue()
    # a wrong result measured against the tolerance, not a crash
    assert all(float(ln.split("max err")[1].split()[0]) > 0.01 for ln in lines), out.getvalue()


def test_a_check_that_raises_is_a_failure():
    def boom(env):
        raise RuntimeError("kernel not found")

    out = io.StringIO()
    checks = [selftest.Check("ok", lambda env: 0.0, 0.0), selftest.Check("broken", boom, 1.0)]
    assert selftest.run_checks(checks, selftest.Env(device=None, harness=True), out) == 1
    assert out.getvalue().splitlines()[1].startswith("FAIL  broken") and "kernel not found" in out.getvalue()


@pytest.mark.parametrize("brand, peak", [("Apple M1", 68), ("Apple M2 Ultra", 800), ("Apple M4 Max", 546),
                                         ("Apple M3 Pro", 150), ("Apple M9 Max", None), ("Intel(R) Core(TM) i7", None),
                                         (None, None)])
def test_peak_bandwidth_by_chip_name(brand, peak):
    assert selftest.peak_bandwidth(brand) == peak


def test_every_op_with_an_mps_kernel_has_a_check():
    """A new ferrum op registered for MPS must get its row in selftest.CHECKS (one line via op_check)."""
    import torch

    mps_ops = {n.removeprefix("ferrum::") for n in torch._C._dispatch_get_registrations_for_dispatch_key("MPS") if n.startswith("ferrum::")}
    checked = {c.name.split()[0] for c in selftest.CHECKS}
    assert mps_ops and mps_ops <= checked, sorted(mps_ops - checked)
