"""The distribution examples run as scripts: exit 0 and print their summary.

Each example checks its own claims (replicas in sync, identical workers, lazy rows
untouched, loss going down) and prints "<name> example: OK" only if all hold; these
tests also match the individual summary lines so a failure says which claim broke.
"""

import os
import re
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import dist_helpers as dh  # noqa: E402

EXAMPLES = os.path.join(dh.REPO_ROOT, "examples")
TIMEOUT = 240

CASES = {
    "mirrored": (["--steps", "12"], [
        r"strategy: MirroredStrategy, 2 replicas",
        r"embedding slots mirrored on: \['[^']*CPU:0', '[^']*CPU:1'\]",
        r"replicas in sync \(weights and slots\): True",
        r"only looked-up rows changed: True",
        r"iterations=12\b",
    ]),
    "multi_worker": (["--steps", "10", "--timeout", "200"], [
        r"launched 2 workers on \['127\.0\.0\.1:\d+', '127\.0\.0\.1:\d+'\]",
        r"worker 0: 2 replicas in sync",
        r"worker 1: 2 replicas in sync",
        r"weights and slots identical on both workers: True",
        r"iterations=10\b",
    ]),
    "parameter_server": (["--steps", "10"], [
        r"2 workers, 2 parameter servers on 127\.0\.0\.1",
        r"in 2 shards: \(500, 8\) on /job:ps/replica:0/task:0/\S+, "
        r"\(500, 8\) on /job:ps/replica:0/task:1/",
        r"slots placed with their shards: True",
        r"unused rows and their slots untouched: True",
        r"iterations=10\b",
    ]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_reports(name):
    args, patterns = CASES[name]
    code, out = dh.run_script(os.path.join(EXAMPLES, f"{name}.py"), args, TIMEOUT)
    tail = out[-6000:]
    assert code == 0, f"examples/{name}.py exited {code}:\n{tail}"
    assert f"{name} example: OK" in out, tail
    for pattern in patterns:
        assert re.search(pattern, out), f"missing {pattern!r} in:\n{tail}"
    loss = re.search(r"^loss[^:\n]*: ([\d.]+) -> ([\d.]+)", out, re.M)
    assert loss, f"no loss summary line in:\n{tail}"
    first, last = map(float, loss.groups())
    assert last < first, tail
