"""Killing a save at random points never leaves an artifact that loads half-written."""

import random
import signal
import subprocess
import sys
import time

import pytest

import slimkit
from slimkit.errors import SlimkitError

CHILD = r"""
import sys, slimkit
lm = slimkit.load(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    slimkit.save(lm, f"{sys.argv[2]}/run-{i}")
    i += 1
"""

TRIALS = 20


@pytest.mark.slow
def test_killed_saves_never_leave_a_loadable_half_artifact(tiny, tmp_path):
    rng = random.Random(1234)
    model = tiny("gpt2")
    reference = slimkit.load(model)
    for trial in range(TRIALS):
        out = tmp_path / f"trial-{trial}"
        out.mkdir()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(out)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        for entry in out.iterdir():
            if not entry.name.startswith("."):  # a visible artifact is always complete
                _assert_complete(slimkit.load(str(entry)), reference)
                continue
            try:  # a temporary directory is either refused, or complete (killed just before the rename)
                lm = slimkit.load(str(entry))
            except SlimkitError:
                continue
            _assert_complete(lm, reference)


def _assert_complete(lm, reference):
    import torch

    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)
