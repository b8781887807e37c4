"""Run tests/kernels/interpret_cases.py in a subprocess with TRITON_INTERPRET=1.

Why a subprocess: Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, which
happens when kernels/fused_linear_cross_entropy.py is first imported. In this pytest
process kernels/ is already imported (compiled mode, which refuses CPU tensors), and
setting the variable now would not change that; a fresh interpreter with the variable in
its environment is the only robust way. The subprocess reuses the same accuracy helpers
(kernels/testing.py) as the chunked-path tests, so both paths pass the same checks.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("interpret_cases.py")


def _run_cases(marker: str, timeout: int) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
           str(CASES)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter cases failed:\n{output[-6000:]}"
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, output[-3000:]
    return summary


def test_triton_kernels_under_interpreter():
    _run_cases("not slow and not gpu", timeout=300)


@pytest.mark.slow
def test_triton_kernels_under_interpreter_slow():
    _run_cases("slow", timeout=1800)
