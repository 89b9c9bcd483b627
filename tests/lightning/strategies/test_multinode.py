"""Two nodes x one process, simulated on loopback with two torchrun agents (Lightning's TorchElasticEnvironment)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, free_port

SCRIPT = Path(__file__).parent / "scripts" / "multinode_run.py"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 2 nodes x 1 process (15 s)


def test_two_nodes_train_in_lockstep(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
             str(SCRIPT), str(tmp_path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["environment"] == "TorchElasticEnvironment" for r in ranks)
    assert ranks[0]["probe"] == ranks[1]["probe"] and len(ranks[0]["probe"]) == 3
