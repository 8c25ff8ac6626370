"""The core example runs and its loss falls."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_custom_loop_example_loss_falls():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loop.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"loss fell from ([\d.]+) to ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    first, last = map(float, match.groups())
    assert last < 0.8 * first
