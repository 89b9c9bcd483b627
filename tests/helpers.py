"""Helpers for tests that launch real multi-process runs on CPU."""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from lightning_memopt.measuring.memory import collect_garbage

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(
    script: Path, *args: str, timeout: float = 300, env: "dict[str, str] | None" = None
) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process (which may launch more) and fail with its output if it fails."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port()), **(env or {})}
    full_env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def end_distributed_run() -> None:
    """The end of a script that ran in several processes: destroy the process group (gloo's threads abort a process
    that exits with it, pytorch#190489), flush, and leave without the interpreter's teardown, where a C++ thread
    still alive can abort the process after all ("terminate called without an active exception", once on a loaded
    CI machine, after a fit that had written its results). Call it only after the script did its work."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def listed_names(script: Path) -> "list[str]":
    """The first word of each line a GPU script's ``--list`` prints (its checks or groups); runs without a GPU."""
    out = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()]


def assert_refuses_without_cuda(script: Path, out_dir: Path) -> None:
    """A GPU script run without CUDA (and without ``--smoke``) exits 2 with the fix and writes nothing."""
    proc = subprocess.run([sys.executable, str(script), "--out-dir", str(out_dir)], capture_output=True, text=True,
                          check=False, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "expected a CUDA GPU, got none" in proc.stderr and "Fix:" in proc.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())


def write_hub_cache(cache: Path, repo_id: str, config: dict, revision: str = "0123456789abcdef") -> Path:
    """Put ``config`` as ``repo_id``'s config.json into a Hugging Face hub cache directory (huggingface_hub's layout:
    ``models--owner--name/snapshots/<rev>/config.json`` and ``refs/main``); returns the cache directory."""
    import json

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision / "config.json").write_text(json.dumps(config))
    return Path(cache)


def steady_peak(build, loss_of, micro: int, seq: int, vocab: int, steps: int = 3, autocast=None) -> int:
    """The counting allocator's highest per-step peak of steps 2..N of Lightning's automatic optimization (forward,
    ``zero_grad``, backward, AdamW step; Adam's states appear in step 1), in bytes above what was alive before
    ``build()`` made the model. ``loss_of(model, ids)`` runs the forward on a ``micro x seq`` batch of token ids, under
    ``autocast()`` when given."""
    import torch

    from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

    collect_garbage()  # an earlier test's counted storages, freed later, would be taken off the shared count mid-step
    counter = CPUAllocationCounter()
    try:
        base = counter.current_bytes
        torch.manual_seed(0)
        model = build()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        peaks = []
        for step in range(steps):
            counter.reset_peak()
            ids = torch.randint(0, vocab, (micro, seq), generator=torch.Generator().manual_seed(step))
            with autocast() if autocast is not None else contextlib.nullcontext():
                loss = loss_of(model, ids)
            optimizer.zero_grad(set_to_none=True)  # Lightning's order: after the forward
            loss.backward()
            optimizer.step()
            del loss, ids
            peaks.append(counter.peak_bytes - base)
        del model, optimizer
        return max(peaks[1:])
    finally:
        counter.close()
