"""A rank that dies mid-run ends the job in bounded time, and the run resumes from its last checkpoint."""

import json
import time
from pathlib import Path

import pytest

from helpers import run_script

SCRIPT = Path(__file__).parent / "scripts" / "crash_run.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # a 2-process crash and resume (36 s)


def test_a_dead_rank_ends_the_job_and_resuming_loses_nothing(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="exited"):
        run_script(SCRIPT, "--out", str(tmp_path), "--crash-at", "5", timeout=240)
    elapsed = time.monotonic() - start
    assert elapsed < 180  # Lightning's child-process observer kills the survivors within seconds; no 30-min hang
    before = json.loads((tmp_path / "crash_rank0.json").read_text())
    assert sorted(map(int, before)) == [1, 2, 3, 4]  # steps 1-4 ran, step 5 never finished
    last = tmp_path / "ckpt" / "step=4.ckpt"
    assert last.is_dir()

    run_script(SCRIPT, "--out", str(tmp_path), "--resume", str(last), timeout=240)
    after = json.loads((tmp_path / "resume_rank0.json").read_text())
    assert sorted(map(int, after)) == [5, 6]  # continues at step 5: the 4 completed steps are kept
    # (that a resumed run is bit-identical to an uninterrupted one is shown per stage in test_memopt_distributed.py)
