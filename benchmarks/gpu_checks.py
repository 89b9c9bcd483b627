"""Every GPU check of issues 2-5 and 10 in one call (at most 10 minutes on one H100), results written to files.

Each check runs in its own Python process (fresh CUDA state; Liger patches transformers' modules process-wide), with
a share of the time budget; a check that fails or runs out of time is recorded as such and the others still run.
Results: ``<out-dir>/<check>.json`` per check, ``<out-dir>/summary.json``, and the tables printed at the end.

    python benchmarks/gpu_checks.py --list                 # the checks (works without a GPU)
    python benchmarks/gpu_checks.py --out-dir gpu_results  # all of them (needs CUDA)
    python benchmarks/gpu_checks.py --only liger_numerics predictor_accuracy
    python benchmarks/gpu_checks.py --smoke --out-dir smoke  # the script's code paths on CPU, toy sizes

``--smoke`` runs every check on the CPU at toy sizes, so that the plumbing (children, budgets, JSON, tables) and
each check's own code are exercised without a GPU. Its numbers are not measurements; what needs CUDA kernels
(Liger's Triton kernels; Lightning's own DeepSpeedStrategy, which refuses CPU) is recorded as skipped.

Checks:
- ``zero_stages``: ZeRO 0-3 on one GPU, MemOptStrategy vs Lightning's DeepSpeedStrategy: median step time and
  ``torch.cuda.max_memory_allocated`` (issue 2).
- ``predictor_accuracy``: ``estimate_memory`` vs ``max_memory_allocated`` of a training step of a ~0.3B Llama,
  for attention x checkpointing x micro-batch (issue 3).
- ``predictor_families``: the predictor on eight families (dense, LoRA, two MoE routers, sliding window,
  encoder-decoder, masked LM, vision), from the model on the GPU and from the config alone (issue 10;
  ``gpu_families.py``).
- ``liger_numerics``: loss and gradients of a Liger-patched Llama vs the unpatched one, same weights (issue 4).
- ``throughput``: tokens/s and peak memory of a ~0.85B Llama: HF eager, +sdpa, +liger, +both, +checkpointing (issue 4).
- ``monitor``: MemoryMonitor's per-step actual vs predicted peak, and its step-time overhead (issue 5).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: set by ``--smoke``: CPU, toy sizes (see the module docs)
SMOKE = False

TOTAL_SECONDS = 590
CHECKS = {  # name: (description, seconds allowed in all)
    "zero_stages": ("ZeRO 0-3 on 1 GPU: MemOptStrategy vs Lightning DeepSpeedStrategy, step time + peak memory", 170),
    "predictor_accuracy": ("estimate_memory vs torch.cuda.max_memory_allocated, ~0.3B Llama, 8 settings", 70),
    "predictor_families": ("predict (module on the GPU) and estimate_memory (config) vs measured, 8 families", 90),
    "liger_numerics": ("Liger-patched vs unpatched Llama: loss and gradient differences", 35),
    "throughput": ("tokens/s + peak, ~0.85B Llama: eager, sdpa, liger, sdpa+liger, sdpa+checkpointing", 130),
    "monitor": ("MemoryMonitor per-step actual vs predicted, and its overhead", 85),
}
THROUGHPUT_VARIANTS = {  # name: (attention, liger, checkpointing)
    "eager": ("eager", False, False),
    "sdpa": ("sdpa", False, False),
    "eager+liger": ("eager", True, False),
    "sdpa+liger": ("sdpa", True, False),
    "sdpa+checkpointing": ("sdpa", False, True),
}


def device() -> str:
    """``"cuda"``, or ``"cpu"`` with ``--smoke``."""
    return "cpu" if SMOKE else "cuda"


def size(real: int, smoke: int) -> int:
    """A size of the real check, or its toy size with ``--smoke``."""
    return smoke if SMOKE else real


class PeakMemory:
    """Peak allocated bytes since :meth:`reset`: ``torch.cuda.max_memory_allocated``; with ``--smoke`` the CPU's live
    tensors from this probe's creation on (a dispatch mode: CPU kernels' own scratch, such as SDPA's, is not counted,
    as in ``predictor_accuracy.py``)."""

    def __init__(self) -> None:
        self._probe = None
        if SMOKE:
            from lightning_memopt.measuring.memory import DeviceMemoryProbe

            self._probe = DeviceMemoryProbe("cpu", cpu_mode="dispatch")
            self._probe.start()

    def track(self, *objects: object) -> None:
        """Count tensors made before this probe (the model) on the CPU; CUDA's allocator already knows them."""
        if self._probe is not None:
            self._probe.track(*objects)

    def reset(self) -> None:
        import torch

        if self._probe is None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._probe.start_step()

    def peak(self) -> int:
        import torch

        if self._probe is None:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return self._probe.end_step().peak_bytes


def llama(hidden: int, layers: int, intermediate: int, heads: int = 16, kv_heads: int = 4, vocab: int = 32000,
          attention: str = "sdpa"):
    """A Llama from a config with random weights, on the GPU in fp32 (AMP trains it in bf16); toy-sized with
    ``--smoke``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if SMOKE:
        hidden, layers, intermediate, heads, kv_heads, vocab = 64, 2, 128, 4, 2, 256
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096)
    config._attn_implementation = attention
    torch.manual_seed(0)
    with torch.device(device()):
        return LlamaForCausalLM(config).train()


def train_steps(model, batch: int, seq: int, steps: int, warmup: int = 2) -> dict:
    """Plain AMP (bf16 autocast) + AdamW steps in Lightning's order (forward, ``zero_grad``, backward, optimizer step:
    the previous step's gradients are alive during the forward, as ``estimate_memory(engine="torch")`` assumes);
    median step time after ``warmup`` and the peak of the last step."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device())
    memory = PeakMemory()
    memory.track(model)
    times, peak = [], 0
    for step in range(steps):
        memory.reset()
        start = time.perf_counter()
        with torch.autocast(device(), dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's MixedPrecision
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        peak = memory.peak()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times), "tokens_per_s": batch * seq / statistics.median(times),
            "peak_bytes": peak, "loss": float(loss)}


# ---------------------------------------------------------------------------------------------------- the checks
def check_zero_stages(variant: str | None) -> dict:
    """One Lightning fit of a ~0.1B Llama per ``variant`` = ``<strategy>:<stage>``."""
    strategy_name, stage = variant.split(":")
    sys.path.insert(0, str(ROOT / "examples"))
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt import MemOptStrategy

    memory = PeakMemory()

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *_) -> None:
            if not SMOKE:
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_train_start(self, *_) -> None:
            memory.reset()

    timer = Timer()
    strategy = MemOptStrategy(zero=int(stage)) if strategy_name == "memopt" else DeepSpeedStrategy(stage=int(stage))
    trainer = pl.Trainer(accelerator="cpu" if SMOKE else "cuda", devices=1, strategy=strategy, precision="bf16-mixed",
                         max_steps=size(12, 6), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])
    model = CausalLM(hidden_size=size(1024, 64), num_layers=size(8, 2))
    trainer.fit(model, TextDataModule(batch_size=size(8, 2), seq_len=size(256, 32), stride=64))
    steps = [b - a for a, b in zip(timer.starts[3:], timer.starts[4:])]
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    peak = memory.peak()
    return {"strategy": strategy_name, "stage": int(stage), "n_parameters": n,
            "median_step_s": statistics.median(steps),
            "peak_bytes": peak, "peak_bytes_per_param": peak / n}


def check_predictor_accuracy(variant: str | None) -> dict:
    import torch

    from lightning_memopt import apply_activation_checkpointing, estimate_memory

    rows = []
    for attention in ("eager", "sdpa"):
        for checkpointing in (False, True):
            for batch in (1, 4) if not SMOKE else (2,):
                seq = size(1024, 32)
                model = llama(1024, 16, 2816, attention=attention)
                if checkpointing:
                    apply_activation_checkpointing(model)
                est = estimate_memory(model, engine="torch", precision="bf16-mixed", micro_batch_size=batch,
                                      seq_len=seq, attention=attention, activation_checkpointing=checkpointing,
                                      optimizer="adamw" if SMOKE else "adamw-foreach")  # torch's default there
                measured = train_steps(model, batch, seq, steps=3, warmup=1)["peak_bytes"]
                rows.append({"attention": attention, "checkpointing": checkpointing, "micro_batch": batch,
                             "seq_len": seq, "predicted_bytes": est.total, "measured_bytes": measured,
                             "error": (est.total - measured) / measured,
                             "n_parameters": sum(p.numel() for p in model.parameters())})
                del model
                if not SMOKE:
                    torch.cuda.empty_cache()
    return {"rows": rows}


def check_liger_numerics(variant: str | None) -> dict:
    import torch

    from lightning_memopt import apply_liger

    if SMOKE:
        return {"skipped": "Liger's Triton kernels need CUDA"}

    ids = torch.randint(0, 32000, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for patched in (False, True):
        model = llama(512, 4, 1408)
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
            "grad_rel_diff_median": statistics.median(rel.values())}


def check_throughput(variant: str | None) -> dict:
    import torch

    from lightning_memopt import apply_activation_checkpointing, apply_liger

    attention, liger, checkpointing = THROUGHPUT_VARIANTS[variant]
    if SMOKE and liger:
        return {"variant": variant, "skipped": "Liger's Triton kernels need CUDA"}
    model = llama(2048, 16, 5632, attention=attention)
    if liger:
        apply_liger(model, device=torch.device("cuda"))
    if checkpointing:
        apply_activation_checkpointing(model)
    batch, seq = size(4, 2), size(1024, 32)
    result = train_steps(model, batch=batch, seq=seq, steps=size(8, 4), warmup=size(3, 1))
    return {"variant": variant, "n_parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
            "seq_len": seq, **result}


def check_monitor(variant: str | None) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    import tempfile

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt import MemOptStrategy, MemoryMonitor

    rows = []
    for zero in (0, 3):
        monitor = MemoryMonitor(log_every_n_steps=1, plot=False)
        trainer = pl.Trainer(accelerator="cpu" if SMOKE else "cuda", devices=1, strategy=MemOptStrategy(zero=zero),
                             precision="bf16-mixed", max_steps=size(8, 3), logger=CSVLogger(tempfile.mkdtemp()),
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[monitor])
        trainer.fit(CausalLM(hidden_size=size(1024, 64), num_layers=size(8, 2)),
                    TextDataModule(batch_size=size(8, 2), seq_len=size(256, 32), stride=64))
        rows += [{"zero": zero, **{k: r.get(k) for k in ("step", "actual_peak_bytes", "predicted_peak_bytes",
                                                       "prediction_error")}} for r in monitor.history]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "monitor_overhead.py"), "--accelerator", "cpu" if SMOKE else "gpu",
           "--steps", str(size(20, 4)), "--repeats", "1"]
    if SMOKE:
        cmd += ["--warmup", "1", "--hidden", "64", "--layers", "2", "--seq-len", "32", "--batch-size", "2"]
    overhead = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=50, check=False)
    return {"per_step": rows, "overhead_stdout": overhead.stdout[-3000:], "overhead_rc": overhead.returncode}


def check_predictor_families(variant: str | None) -> dict:
    from gpu_families import check_predictor_families as run

    return run(SMOKE, PeakMemory)


RUNNERS = {"zero_stages": check_zero_stages, "predictor_accuracy": check_predictor_accuracy,
           "predictor_families": check_predictor_families,
           "liger_numerics": check_liger_numerics, "throughput": check_throughput, "monitor": check_monitor}
VARIANTS = {"zero_stages": [f"{s}:{z}" for z in range(4) for s in ("memopt", "lightning")],
            "throughput": list(THROUGHPUT_VARIANTS)}
#: ``--smoke``: Lightning's DeepSpeedStrategy refuses CPU
SMOKE_VARIANTS = {"zero_stages": [f"memopt:{z}" for z in range(4)]}


# ---------------------------------------------------------------------------------------------------- plumbing
def _child(check: str, variant: str | None, timeout: float) -> dict:
    """Run ``check`` (one ``variant`` of it) in a fresh process; its JSON result, or why there is none."""
    cmd = [sys.executable, __file__, "--run", check] + (["--variant", variant] if variant else [])
    cmd += ["--smoke"] if SMOKE else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"check": check, "variant": variant, "status": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"check": check, "variant": variant, "status": f"failed (exit {proc.returncode})", "wall_s": wall,
                "stderr_tail": proc.stderr[-3000:]}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1][len("RESULT "):])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the checks and exit (no GPU needed)")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=None, help="run only these checks")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_results"), help="where the JSON files go")
    parser.add_argument("--smoke", action="store_true", help="every check on the CPU at toy sizes (not measurements)")
    parser.add_argument("--run", choices=sorted(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, (description, seconds) in CHECKS.items():
            print(f"{name:20s} {description} (at most {seconds} s)")
        return 0
    import torch

    global SMOKE
    SMOKE = args.smoke
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_checks.py: expected a CUDA GPU, got none (torch.cuda.is_available() is False). Fix: run it on a"
              " machine with a GPU; `--list` shows the checks.", file=sys.stderr)
        return 2
    if args.run:  # a child process: one check (or one variant of it)
        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(RUNNERS[args.run](args.variant)), flush=True)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.perf_counter()
    for name in args.only or list(CHECKS):
        variants = (SMOKE_VARIANTS if SMOKE else {}).get(name, VARIANTS.get(name, [None]))
        runs = []
        for variant in variants:  # each variant gets its share of the check's time, within the total
            left = TOTAL_SECONDS - (time.perf_counter() - started)
            if left < 5:
                runs.append({"check": name, "variant": variant, "status": "skipped: the 10-minute budget is spent"})
                continue
            runs.append(_child(name, variant, min(CHECKS[name][1] / len(variants), left)))
        ok = all(r.get("status") == "ok" for r in runs)
        results[name] = runs[0] if variants == [None] else {"status": "ok" if ok else "partly failed", "runs": runs}
        (args.out_dir / f"{name}.json").write_text(json.dumps(results[name], indent=2))
        print(f"{name}: {results[name]['status']} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    name = "CPU (smoke: toy sizes, not measurements)" if SMOKE else torch.cuda.get_device_name(0)
    summary = {"device": name, "torch": torch.__version__, "results": results}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from gpu_tables import tables as render

    tables = render(results)
    (args.out_dir / "tables.md").write_text(tables + "\n")
    print(f"device: {summary['device']}\n{tables}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
