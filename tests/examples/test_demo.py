"""examples/demo.py on CPU: 2 processes under ZeRO-2, a few steps; the loss printed at the end falls."""

import re

from helpers import ROOT, run_script


def test_demo_trains_and_the_loss_falls():
    out = run_script(ROOT / "examples" / "demo.py", "--steps", "5", timeout=180).stdout
    losses = {int(step): float(loss) for step, loss in re.findall(r"^\s*(\d+) \| (\d+\.\d+)$", out, re.MULTILINE)}
    assert set(losses) == {1, 5}, out
    assert losses[5] < losses[1], out
