"""examples/lecture_8b.sh: every command of the script, run in-process through the CLI's ``main`` (one import
instead of one Python start per command), plus the script's own syntax check."""

import shlex
import subprocess

from helpers import ROOT
from lightning_memopt.cli import main

SCRIPT = ROOT / "examples" / "lecture_8b.sh"


def _commands() -> list[list[str]]:
    lines = [line.strip() for line in SCRIPT.read_text().splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("$CLI ")]


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_command_of_the_script_succeeds(capsys):
    commands = _commands()
    assert [c[0] for c in commands].count("plan") == 1 and len(commands) >= 5
    for argv in commands:
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "does NOT fit in 80.00 GiB" in out  # the 8B on one GPU with plain AMP + Adam
    assert "accumulate_grad_batches" in out  # plan: micro-batch and gradient accumulation
