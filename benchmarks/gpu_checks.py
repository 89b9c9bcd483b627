"""Every GPU check in one call, within one time budget: the accuracy matrix, the speed suite, Liger's numerics and the
GPU-marked tests, each in its own processes, results written to files.

    python benchmarks/gpu_checks.py --list                                  # the checks (works without a GPU)
    python benchmarks/gpu_checks.py --out-dir gpu_results                   # all of them (needs CUDA), <= 9 minutes
    python benchmarks/gpu_checks.py --out-dir gpu_results --only accuracy liger_numerics
    python benchmarks/gpu_checks.py --smoke --out-dir smoke                 # the code paths on the CPU, toy sizes

Checks, in this order, each with its share of ``--budget-seconds``:

- ``accuracy``: ``gpu_accuracy.py`` (the predictor against ``max_memory_allocated``, ``max_memory_reserved`` and
  ``mem_get_info``; 8 model kinds, one process per kind) into ``<out-dir>/accuracy/``.
- ``speed``: ``gpu_speed.py`` (MemOptStrategy vs Lightning's DeepSpeedStrategy, the 1B variants, budget
  checkpointing, the monitor's overhead) into ``<out-dir>/speed/``.
- ``liger_numerics``: loss and gradients of a Liger-patched Llama against the unpatched one, same weights.
- ``gpu_tests``: ``pytest -m gpu``, the tests marked for a GPU.

A check that fails or runs out of time is recorded as such and the others still run. ``<out-dir>/summary.json``
holds every check's status, Liger's numbers and the tests' closing line. ``--smoke`` runs the first three on the CPU
at toy sizes (what needs CUDA kernels is recorded as skipped), so that a GPU run does not find the script's bugs; its
numbers are not measurements.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {  # name: (description, share of the budget)
    "accuracy": ("gpu_accuracy.py: predicted vs allocated, reserved and device memory, 8 model kinds", 0.42),
    "speed": ("gpu_speed.py: ZeRO side by side, 1B variants, budget checkpointing, monitor overhead", 0.40),
    "liger_numerics": ("Liger-patched vs unpatched Llama: loss and gradient differences", 0.08),
    "gpu_tests": ("pytest -m gpu: the tests marked for a GPU", 0.10),
}


def liger_numerics() -> dict:
    """Loss and gradients of a small Llama with and without Liger's kernels, from the same weights (bf16 autocast)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_memopt import apply_liger

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    ids = torch.randint(0, 32000, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for patched in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).train()
        if patched:
            apply_liger(model, device=torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[patched] = (float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    (ref_loss, ref), (liger_loss, lig) = results[False], results[True]
    rel = {n: float((lig[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)) for n in ref}
    return {"loss_unpatched": ref_loss, "loss_liger": liger_loss, "loss_abs_diff": abs(ref_loss - liger_loss),
            "grad_rel_diff_max": max(rel.values()), "grad_rel_diff_max_param": max(rel, key=rel.get),
            "grad_rel_diff_median": statistics.median(rel.values())}  # fmt: skip


def command(name: str, out_dir: Path, seconds: float, smoke: bool) -> "list[str]":
    """The child process of a check."""
    flags = ["--smoke"] if smoke else []
    if name in ("accuracy", "speed"):
        script = ROOT / "benchmarks" / f"gpu_{name}.py"
        # the child spends a little less than its share: its own processes start and stop inside it
        return [sys.executable, str(script), "--out-dir", str(out_dir / name), "--budget-seconds",
                str(max(10, int(seconds * 0.92))), *flags]  # fmt: skip
    if name == "liger_numerics":
        return [sys.executable, __file__, "--run-liger", *flags]
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]


def run(name: str, out_dir: Path, seconds: float, smoke: bool) -> dict:
    """One check in its own process, killed when its share is spent."""
    if smoke and name == "gpu_tests":
        return {"status": "skipped: the GPU-marked tests need CUDA"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command(name, out_dir, seconds, smoke), capture_output=True, text=True, cwd=ROOT,
                              timeout=seconds, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        return {"status": f"timed out after {seconds:.0f} s", "stdout_tail": (err.stdout or b"")[-1500:].decode()}
    out: dict = {"wall_s": round(time.perf_counter() - started, 1), "stdout_tail": proc.stdout[-4000:]}
    if name == "liger_numerics" and proc.returncode == 0:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        out.update(json.loads(lines[-1][len("RESULT "):]) if lines else {})
    if name == "gpu_tests":  # pytest's closing line; its exit code says whether every test passed
        out["closing_line"] = (proc.stdout.strip().splitlines() or [""])[-1]
    out["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-3000:]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the checks and exit (no GPU needed)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run only these checks")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_results"), help="where the results go")
    parser.add_argument("--budget-seconds", type=float, default=540, help="wall time for everything")
    parser.add_argument("--smoke", action="store_true", help="the checks on the CPU at toy sizes (not measurements)")
    parser.add_argument("--run-liger", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, (description, share) in CHECKS.items():
            print(f"{name:16s} {description} ({share:.0%} of the budget)")
        return 0
    import torch

    if args.run_liger:  # a child process
        result = {"skipped": "Liger's Triton kernels need CUDA"} if args.smoke else liger_numerics()
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_checks.py: expected a CUDA GPU, got none (torch.cuda.is_available() is False). Fix: run it on a"
              " machine with a GPU; `--list` shows the checks, `--smoke` runs them on the CPU.", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.only or list(CHECKS)
    started, results = time.perf_counter(), {}
    for i, name in enumerate(names):
        left = args.budget_seconds - (time.perf_counter() - started)
        shares = sum(CHECKS[n][1] for n in names[i:])
        seconds = left * CHECKS[name][1] / shares  # what a check leaves unused goes to the next ones
        results[name] = run(name, args.out_dir, seconds, args.smoke) if left > 5 else {"status": "skipped: no time"}
        print(f"{name}: {results[name]['status']} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    device = "CPU (smoke: toy sizes, not measurements)" if args.smoke else torch.cuda.get_device_name(0)
    summary = {"device": device, "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1),
               "results": results}  # fmt: skip
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
