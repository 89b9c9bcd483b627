"""Step-time overhead of MemoryMonitor: the same fit with and without it, each in a fresh process.

Each configuration runs in its own process, the two alternate ``--repeats`` times, and each child reports the median
wall time between consecutive ``on_train_batch_start`` calls after ``--warmup`` steps (the whole step: forward,
backward, optimizer, every callback).

    python benchmarks/monitor_overhead.py                      # CPU, MemoryMonitor(log_every_n_steps=1)
    python benchmarks/monitor_overhead.py --mode allocator     # the opt-in counting allocator (CPU) / allocator stats
    python benchmarks/monitor_overhead.py --accelerator gpu    # one GPU
"""

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt.lightning.callbacks.memory_monitor import MemoryMonitor

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.allocations: list[int] = []

        def on_train_batch_start(self, *_: object) -> None:
            if args.accelerator == "gpu":
                import torch

                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())
            if args.child == "monitor" and args.accelerator == "cpu" and args.mode == "allocator":
                from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

                self.allocations.append(CPUAllocationCounter().num_allocations)  # the monitor's, installed

    timer = StepTimer()
    callbacks: list = [timer]
    hook_seconds = [0.0]
    if args.child == "monitor":
        monitor = MemoryMonitor(log_every_n_steps=args.log_every, plot=False, device_memory=args.device_memory,
                                cpu_mode=args.mode, cuda_mode=args.mode)  # fmt: skip
        for name in ("_before_step", "_after_step"):  # time spent in the monitor's per-step hooks
            original = getattr(monitor, name)

            def timed(*a: object, _original=original) -> None:
                start = time.perf_counter()
                _original(*a)
                hook_seconds[0] += time.perf_counter() - start

            setattr(monitor, name, timed)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision="bf16-mixed", max_steps=args.steps,
        logger=CSVLogger(args.log_dir), callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    data = TextDataModule(batch_size=args.batch_size, seq_len=args.seq_len, stride=8)
    trainer.fit(CausalLM(hidden_size=args.hidden, num_layers=args.layers), data)
    steps = [b - a for a, b in zip(timer.starts[args.warmup :], timer.starts[args.warmup + 1 :])]
    result = {"median_step_s": statistics.median(steps), "steps": len(steps),
              "hook_s_per_step": hook_seconds[0] / args.steps}  # fmt: skip
    if args.child == "monitor" and args.mode == "dispatch":
        result["dispatch_cost_s"] = dispatch_cost(trainer.lightning_module, data, args.accelerator)
    if args.child == "monitor" and args.accelerator == "cpu" and args.mode == "allocator":
        import torch

        from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

        counts = timer.allocations[args.warmup :]
        result["allocations_per_step"] = statistics.median(b - a for a, b in itertools.pairwise(counts))
        x = [torch.empty(256) for _ in range(10)]  # the allocator's cost per allocation, vs. the default allocator
        counter = CPUAllocationCounter()  # installed again (the monitor removed it at the end of the fit)
        start = time.perf_counter()
        for _ in range(100_000):
            x.append(torch.empty(256))
            x.pop(0)
        with_counter = (time.perf_counter() - start) / 100_000
        counter.close()
        start = time.perf_counter()
        for _ in range(100_000):
            x.append(torch.empty(256))
            x.pop(0)
        result["allocator_cost_s"] = with_counter - (time.perf_counter() - start) / 100_000
    print(json.dumps(result))


def dispatch_cost(module: object, data: object, accelerator: str, rounds: int = 7) -> float:
    """The dispatch tracker's cost per training step: the same step (forward, backward, AdamW) timed without and
    with a ``TensorMemoryTracker`` active, alternating in this process (so that the machine's load drifts out),
    median difference."""
    import torch

    from lightning_memopt.measuring.tensor_tracker import TensorMemoryTracker

    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    module = module.to(device)
    batch = next(iter(data.train_dataloader())).to(device)
    optimizer = torch.optim.AdamW(module.parameters())
    tracker = TensorMemoryTracker(device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module.model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    tracker.track(module, optimizer)
    differences = []
    for _ in range(rounds):
        plain = step()
        with tracker:
            differences.append(step() - plain)
    return statistics.median(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--mode", default="dispatch", choices=("dispatch", "allocator"),
                        help="the monitor's cpu_mode / cuda_mode")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-memory", default=None)
    parser.add_argument("--log-dir", default="/tmp/monitor_overhead")
    parser.add_argument("--child", choices=("monitor", "none"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    passthrough = [a for a in sys.argv[1:]]
    times: dict[str, list[float]] = {"none": [], "monitor": []}
    details: list[dict] = []
    for _ in range(args.repeats):
        for kind in ("none", "monitor"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", kind], capture_output=True,
                                 text=True, check=True, cwd=ROOT)  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            times[kind].append(result["median_step_s"])
            if kind == "monitor":
                details.append(result)
    base, monitored = statistics.median(times["none"]), statistics.median(times["monitor"])
    print(f"device: {args.accelerator}, model: hidden {args.hidden} x {args.layers} layers, batch {args.batch_size}"
          f" x {args.seq_len}, log_every_n_steps={args.log_every}, mode {args.mode},"
          f" {args.repeats} runs each")  # fmt: skip
    runs = {kind: [round(t * 1e3, 1) for t in times[kind]] for kind in ("none", "monitor")}
    print(f"median step without MemoryMonitor: {base * 1e3:.1f} ms  (runs: {runs['none']})")
    print(f"median step with MemoryMonitor:    {monitored * 1e3:.1f} ms  (runs: {runs['monitor']})")
    print(f"overhead, end to end: {100 * (monitored / base - 1):+.1f} % (noisy on a shared machine)")
    hooks = statistics.median(d["hook_s_per_step"] for d in details)
    print(f"time in the monitor's hooks: {hooks * 1e3:.3f} ms per step = {100 * hooks / base:.2f} % of a step")
    if "dispatch_cost_s" in details[0]:
        cost = statistics.median(d["dispatch_cost_s"] for d in details)
        print(f"dispatch tracker (alternating steps without / with it): {cost * 1e3:.2f} ms per step ="
              f" {100 * cost / base:.2f} % of a step")
        print(f"overhead, hooks + dispatch tracker: {100 * (hooks + cost) / base:.2f} %")
    if "allocations_per_step" in details[0]:
        allocs = statistics.median(d["allocations_per_step"] for d in details)
        cost = statistics.median(d["allocator_cost_s"] for d in details)
        print(f"counting allocator: {allocs:.0f} allocations per step x {cost * 1e9:.0f} ns ="
              f" {allocs * cost * 1e3:.3f} ms per step = {100 * allocs * cost / base:.2f} % of a step")
        print(f"overhead, hooks + allocator: {100 * (hooks + allocs * cost) / base:.2f} %")


if __name__ == "__main__":
    main()
