"""GPU speed, side by side (issue 18): step time, tokens/s and peak memory, in one call that fits a time budget.

Three groups, each of one or two parts; every part runs in a fresh Python process with its share of the budget
(``--budget-seconds``, default 240 s, process starts included) and is killed when its share is spent. A part that
fails or runs out of time is recorded as such, what it finished is kept, and the other parts still run. The same
model, data and precision (bf16-mixed: fp32 weights, bf16 autocast, torch's AdamW) on both sides of every comparison.

- ``zero`` (part ``zero``): ``MemOptStrategy(zero=s)`` vs Lightning's ``DeepSpeedStrategy(stage=s)`` for s = 1, 2, 3
  on one GPU, a 0.50B Llama (4 x 1024), in a protocol that can judge issue 18's 2 % (below): step time, with a 95 %
  confidence interval and a verdict, and peak allocated. A third arm, Lightning's strategy with the allocator's
  expandable segments on for the fit (as ``MemOptStrategy`` does by default), compares like with like; the ratio of
  the two Lightning arms is the allocator's own effect.
- ``llama1b``: a Llama-3.2-1B-shaped model (vocab 128,256, tied embeddings), 1 x 4096, a plain AMP loop in
  Lightning's order (forward, ``zero_grad``, backward, AdamW step). Part ``hf``: the bf16 matmul peak (8192^3), then
  HF eager, SDPA, eager + full checkpointing, and budget checkpointing (``checkpoint_to_fit``, the planner behind
  ``MemOptStrategy(activation_checkpointing="budget", memory_budget=...)``) at 75 % and 50 % of the eager peak.
  Part ``liger`` (own process: Liger patches transformers' modules process-wide): SDPA + Liger, eager + Liger (its
  default kernels, fused linear cross-entropy included). Tokens/s, peak allocated and reserved, MFU.
- ``monitor`` (part ``monitor``): Lightning fits of the same 1B (SDPA) without, with ``MemoryMonitor()`` at its
  defaults, with ``MemoryMonitor(snapshot_on_oom=False)`` (no allocation history recorded), and without again: the
  step-time overhead (the target compares the defaults with the mean of the fits without).

Warm-up steps (Triton compilation, cuBLAS/cuDNN plans, lazily created optimizer states) are not timed; every figure
is the median of the timed steps (``TIMED`` >= 10), with the spread (interquartile range, min, max) next to it. The
peaks are ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the timed steps; the units of a part
share its process (the first one starts fresh, the next ones after the earlier ones' memory is freed), so the peak
allocated that the targets compare is net of what was still allocated when the unit started (recorded as
``allocated_before_bytes``; about 0 when everything was freed). MFU = tokens/s x
(6 N + 12 L H Q T) / the measured matmul peak (PaLM, Chowdhery et al. 2022, appendix B: N parameters, L layers,
H heads of size Q, T tokens of context; checkpointing's recomputation is not counted).

The ``zero`` protocol. Rounds of one fit per (stage, arm) in one process, in a balanced order (as listed, then reversed:
A B C ... C B A), as many rounds as the part's time allows (``--rounds`` at most). Each fit starts from a state made and
checked clean: DeepSpeed's hold on the earlier fits' models released (``MemOptStrategy``'s teardown does it; after a
``DeepSpeedStrategy`` fit the suite calls the same function), garbage collected, the CUDA cache emptied, then no
DeepSpeed engine alive and at most ``CLEAN_BYTES`` allocated and reserved; the allocator setting each arm runs with is
read at the fit's start. A fit is ``ZERO_WARMUP`` untimed steps, then ``ZERO_TIMED`` timed ones: a step lasts from its
batch start to the next one's, taken from CUDA events recorded on the current stream, with no synchronisation between
the timed steps. Per stage and pair of arms, each round gives the ratio of the two fits' medians; :mod:`_timing` makes
the ratio (the geometric mean over rounds), its 95 % interval (the wider of Student's t over the rounds and a bootstrap
of the steps within the fits) and the verdict: "within 2 %", "slower by X %", or "undecided" when the half-width is
above 1 % (or the interval holds 1.02). Rounds with a fit that started unclean, or with another allocator setting than
its arm's, are left out. The planned time (printed first) comes from the H200 runs of 2026-12-04: a fit costs
``ZERO_FIT_S`` plus its steps (``ZERO_STEP_S`` each); the part's process start and first fit's one-time costs
``ZERO_START_S``.

Output (at most 4 files): ``<out-dir>/<group>.json`` for each group run and ``<out-dir>/summary.json`` (device,
versions, the plan, statuses, the targets of issue 18 as ratios with pass/fail, the zero protocol's comparisons, the
tables); the plan and the tables are printed.

    python benchmarks/gpu_speed.py --list                               # the groups (no GPU needed)
    python benchmarks/gpu_speed.py --out-dir speed                      # all of them, <= 240 s on one GPU
    python benchmarks/gpu_speed.py --out-dir speed --only zero --budget-seconds 450  # the 2 % protocol, ~4 rounds
    python benchmarks/gpu_speed.py --out-dir speed --only zero --stages 3 --budget-seconds 300
    python benchmarks/gpu_speed.py --smoke --out-dir smoke              # every code path on the CPU, toy sizes

``--smoke`` runs every part on the CPU at toy sizes (peaks: live CPU tensors, counted by a dispatch probe), so that
the plumbing and each measurement's own code run without a GPU; its numbers are not measurements. The zero protocol
runs 2 rounds of 2 + 6 steps a fit, its Lightning arms on a CPU stand-in (Lightning's ``DeepSpeedStrategy`` with
DDP's environment setup in place of its CUDA check, as ``MemOptStrategy`` does on CPU). What needs CUDA is recorded
as skipped: Liger's Triton kernels.
"""

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from _timing import balanced_orders, paired_ratio, t_quantile_975, verdict

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
#: set by ``--smoke``: CPU, toy sizes
SMOKE = False
WARMUP, TIMED = 3, 10
MONITOR_TIMED = 15  # the 1 % target wants a tighter median
#: the zero protocol: untimed and timed steps per fit, its arms, the most rounds, the target and the precision needed
ZERO_WARMUP, ZERO_TIMED = 8, 30
ZERO_SMOKE_STEPS = 2, 6  # ``--smoke``: warm-up and timed steps
ZERO_ARMS = ("memopt", "lightning", "lightning+es")
ZERO_ROUNDS, ZERO_SMOKE_ROUNDS = 8, 2
#: (label, arm A, arm B): the ratios A / B reported at each stage; the first is issue 18's target
COMPARISONS = (("MemOptStrategy / DeepSpeedStrategy", "memopt", "lightning"),
               ("MemOptStrategy / DeepSpeedStrategy + expandable segments (same allocator)", "memopt", "lightning+es"),
               ("DeepSpeedStrategy + expandable segments / DeepSpeedStrategy (the allocator alone)", "lightning+es",
                "lightning"))  # fmt: skip
TOLERANCE, PRECISION = 0.02, 0.01
#: planning (2026-12-04 H200, speed_zero.json): seconds per step, seconds of a fit besides its steps (Trainer, model,
#: engine, teardown), seconds of the part's process start with its first fit's one-time costs (CUDA, DeepSpeed, NCCL)
ZERO_STEP_S = {1: 0.13, 2: 0.13, 3: 0.27}
ZERO_FIT_S = {1: 4.0, 2: 4.0, 3: 5.5}
ZERO_START_S = 30
BURN_IN_S = 3  # bf16 matmuls before the first fit, so that the GPU's clocks are up
#: a fit starts clean with at most this much allocated and reserved: 0.5 % of a zero fit's 13 GB peak (what the
#: earlier fits left was 512 B at ZeRO-1/2, 4.0 GB per ZeRO-3 fit before DeepSpeed's globals were released)
CLEAN_BYTES = 64 * 2**20
#: set in the zero part's process from ``--stages`` and ``--rounds``
STAGES, ROUNDS = (1, 2, 3), ZERO_ROUNDS
#: group: (description, parts); part: weight (its share of the budget), seconds a unit of it needs to be started
GROUPS = {
    "zero": ("MemOptStrategy(zero=s) vs DeepSpeedStrategy(stage=s) (+ expandable segments), s = 1-3, 0.50B Llama,"
             " interleaved rounds: step-time ratios with 95 % CI and verdict, peak", ["zero"]),
    "llama1b": ("Llama-3.2-1B shape at 1 x 4096: eager, sdpa, liger, sdpa+liger, checkpointing (full, budget)",
                ["hf", "liger"]),
    "monitor": ("MemoryMonitor() on the 1B (sdpa): step time without / with / without history / without",
                ["monitor"]),
}
PARTS = {"zero": 130, "hf": 55, "liger": 45, "monitor": 45}
#: seconds one unit (a fit, a variant) of a part needs on the GPU; a unit is not started with less left
UNIT_SECONDS = {"zero": 8, "hf": 9, "liger": 9, "monitor": 6}
SMOKE_SKIP = {"liger": "Liger's Triton kernels need CUDA (--smoke)"}
#: at least this many seconds for a part to be started (GPU: process start, imports, CUDA context, first unit)
MIN_PART_SECONDS = 15
RESERVE_SECONDS = 3  # the parent's own end: files and tables


def device() -> str:
    """``"cuda"``, or ``"cpu"`` with ``--smoke``."""
    return "cpu" if SMOKE else "cuda"


def size(real: int, smoke: int) -> int:
    """A size of the real run, or its toy size with ``--smoke``."""
    return smoke if SMOKE else real


# ---------------------------------------------------------------------------------------------------- measuring
def sync() -> None:
    if not SMOKE:
        import torch

        torch.cuda.synchronize()


class Memory:
    """Peak allocated (and reserved) bytes since :meth:`reset`: the CUDA caching allocator's statistics; with
    ``--smoke`` the live CPU tensors counted by a dispatch probe (tensors made before it: :meth:`track`)."""

    def __init__(self) -> None:
        self._probe = None
        if SMOKE:
            from lightning_memopt.measuring.memory import DeviceMemoryProbe

            self._probe = DeviceMemoryProbe("cpu", cpu_mode="dispatch")
            self._probe.start()

    def track(self, *objects: object) -> None:
        if self._probe is not None:
            self._probe.track(*objects)

    def current(self) -> int:
        import torch

        return self._probe.current_bytes if self._probe is not None else int(torch.cuda.memory_allocated())

    def reset(self) -> None:
        import torch

        sync()
        if self._probe is None:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._probe.start_step()

    def read(self) -> tuple[int, int | None]:
        """(peak allocated, peak reserved or ``None`` on the CPU) since :meth:`reset`."""
        import torch

        sync()
        if self._probe is None:
            return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
        return self._probe.end_step().peak_bytes, None

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()


def spread(times: list[float]) -> dict:
    """Median and spread of step times (seconds): the figure is the median; IQR relative to it."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    median = statistics.median(times)
    return {"median_step_s": median, "p25_step_s": q1, "p75_step_s": q3, "min_step_s": min(times),
            "max_step_s": max(times), "iqr_rel": (q3 - q1) / median, "timed_steps": len(times)}


def free_memory() -> None:
    import torch

    from lightning_memopt.measuring.memory import collect_garbage

    collect_garbage()
    if not SMOKE:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


#: weak references to the DeepSpeed engines of the fits so far: none may be alive when a fit starts
ENGINES: "list[weakref.ref]" = []


def live_bytes() -> "tuple[int, int | None]":
    """(allocated, reserved) bytes now: the CUDA caching allocator's; with ``--smoke`` the CPU tensors alive
    (storages counted once) and ``None``."""
    import torch

    if not SMOKE:
        return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())
    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            with_storage = obj.untyped_storage()
            storages[with_storage.data_ptr()] = with_storage.nbytes()
    return sum(storages.values()), None


def clean_state() -> dict:
    """Make the state a fit starts from, and check it: DeepSpeed's leftovers released, garbage collected, the CUDA
    cache emptied; clean when no DeepSpeed engine of an earlier fit is alive and at most ``CLEAN_BYTES`` are
    allocated and reserved."""
    import torch

    if not SMOKE and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # private; empty_cache also does it (2.11)
        torch._C._cuda_clearCublasWorkspaces()
    free_memory()
    allocated, reserved = live_bytes()
    engines = sum(ref() is not None for ref in ENGINES)
    clean = engines == 0 and allocated <= CLEAN_BYTES and (reserved or 0) <= CLEAN_BYTES
    return {"allocated_bytes": allocated, "reserved_bytes": reserved, "engines_alive": engines, "clean": clean}


def expandable_segments_now() -> "bool | None":
    """Whether the caching allocator makes expandable segments now (``None`` on the CPU)."""
    if SMOKE:
        return None
    from lightning_memopt.core import compat

    return compat.allocator_options().get("expandable_segments") == "true"


def clock_mhz() -> "int | None":
    """The GPU's SM clock now (``torch.cuda.clock_rate``, through NVML), or ``None`` where it cannot be read."""
    if SMOKE:
        return None
    import torch

    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no pynvml, or NVML refuses
        return None


def burn_in(seconds: float = BURN_IN_S) -> dict:
    """bf16 matmuls for ``seconds``, untimed, so that the first fit does not meet the GPU's clocks still rising."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    before, start, n = clock_mhz(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        n += 20
    return {"matmuls": n, "clock_mhz_before": before, "clock_mhz_after": clock_mhz()}


# ---------------------------------------------------------------------------------------------------- models
def zero_config() -> Any:
    """The ``zero`` group's Llama: 0.50B (hidden 1536, 16 layers, 12 heads of 128, 4 KV heads, vocab 32,000)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab = (1536, 16, 12, 4, 4096, 32000) if not SMOKE else (64, 2, 4, 2, 128, 512)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return config


def llama1b_config(attention: str) -> Any:
    """Llama-3.2-1B's published config (the package's preset); toy-sized with ``--smoke``."""
    from transformers import AutoConfig

    from lightning_memopt.predictor.read.presets import get_preset

    config = AutoConfig.for_model(**get_preset("llama-3.2-1b"))
    if SMOKE:
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=512))
    config._attn_implementation = attention
    return config


def build(config: Any) -> Any:
    """The causal LM of ``config`` with seeded random weights, in fp32 on the device (AMP trains it in bf16)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device()):
        return LlamaForCausalLM(config).float().train()


def flops_per_token(model: Any, seq: int) -> float:
    """6 N + 12 L H Q T (PaLM, appendix B): N parameters (tied embeddings counted once), attention over T tokens."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq


def tokens(vocab: int, rows: int, seq: int) -> Any:
    """Fixed random token ids (the same data on every side of a comparison)."""
    import torch

    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- a child: units
class Part:
    """One part in its child process: runs units within the part's seconds, appends one JSON line per unit."""

    def __init__(self, name: str, records: Path, seconds: float) -> None:
        self.name, self.records, self.deadline = name, records, time.perf_counter() + seconds
        self.results: dict[str, dict] = {}

    def emit(self, record: dict) -> None:
        self.results[record["name"]] = record
        with self.records.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def skip(self, name: str, why: str) -> None:
        self.emit({"name": name, "status": f"skipped: {why}"})

    def run(self, name: str, fn: Callable[[], dict], seconds: float | None = None) -> dict | None:
        """Run one unit if the part has ``seconds`` left for it; record its result, or why it has none."""
        need = 1 if SMOKE else (seconds or UNIT_SECONDS[self.name])
        left = self.deadline - time.perf_counter()
        if left < need:
            self.skip(name, f"the part's time share is spent ({left:.0f} s left, {need:.0f} s needed)")
            return None
        start = time.perf_counter()
        try:
            record = {"name": name, "status": "ok", **fn()}
        except Exception as err:  # recorded; the next unit still runs
            record = {"name": name, "status": f"failed: {type(err).__name__}: {str(err)[:600]}"}
        record["wall_s"] = round(time.perf_counter() - start, 2)
        free_memory()
        self.emit(record)
        return record if record["status"] == "ok" else None


def train_steps(model: Any, batch: int, seq: int, timed: int = TIMED) -> dict:
    """Plain AMP (bf16 autocast) + AdamW in Lightning's order; ``WARMUP`` untimed steps, then ``timed`` ones."""
    import torch

    memory = Memory()
    before = memory.current()
    memory.track(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = tokens(model.config.vocab_size, batch, seq).to(device())
    times = []
    for step in range(WARMUP + timed):
        if step == WARMUP:
            memory.reset()
        sync()
        start = time.perf_counter()
        with torch.autocast(device(), dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's MixedPrecision
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    allocated, reserved = memory.read()
    memory.close()
    stats = spread(times)
    return {"batch": batch, "seq_len": seq, "tokens_per_s": batch * seq / stats["median_step_s"], **stats,
            "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved, "allocated_before_bytes": before,
            "net_peak_allocated_bytes": allocated - before, "loss": float(loss)}


def llama1b_variant(attention: str, liger: bool = False, checkpointing: bool = False,
                    budget: int | None = None) -> dict:
    """One 1B variant: built, transformed, trained; tokens/s, peaks, FLOPs per token (MFU: the parent)."""
    import torch

    from lightning_memopt import apply_activation_checkpointing, apply_liger
    from lightning_memopt.planning import checkpoint_to_fit

    batch, seq = 1, size(4096, 256)
    model = build(llama1b_config(attention))
    out: dict[str, Any] = {"attention": attention, "liger": liger, "n_parameters": sum(p.numel() for p in
                                                                                          model.parameters())}
    if liger:
        apply_liger(model, device=torch.device("cuda"))
    if checkpointing:
        apply_activation_checkpointing(model)
    if budget is not None:
        start = time.perf_counter()
        plan = checkpoint_to_fit(model, budget, engine="torch", precision="bf16-mixed", micro_batch_size=batch,
                                 seq_len=seq, optimizer="adamw" if SMOKE else "adamw-foreach")  # torch's default
        out["plan"] = {**plan.to_dict(), "blocks": None, "seconds": round(time.perf_counter() - start, 2)}
    out["flops_per_token"] = flops_per_token(model, seq)
    out.update(train_steps(model, batch, seq))
    if budget is not None:
        out["budget_bytes"] = budget
        out["within_budget"] = out["net_peak_allocated_bytes"] <= budget
    return out


def matmul_peak() -> dict:
    """The bf16 matmul peak of this device: median over 20 timed 8192^3 products (toy size with ``--smoke``)."""
    import torch

    n = size(8192, 256)
    a, b = (torch.randn(n, n, device=device(), dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i >= 5:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"n": n, "median_s": median, "tflops": 2 * n**3 / median / 1e12, "tflops_best": 2 * n**3 / min(times) / 1e12}


def part_hf(part: Part) -> None:
    """The matmul peak, then the 1B variants, those the targets need first (eager is each budget's base)."""
    part.run("matmul", matmul_peak, seconds=3)
    eager = part.run("eager", lambda: llama1b_variant("eager"))
    part.run("eager+checkpointing", lambda: llama1b_variant("eager", checkpointing=True))
    for share in (75, 50):
        name = f"eager+budget {share}%"
        if eager is None:
            part.skip(name, "the budget is a share of the eager peak, which was not measured")
            continue
        budget = int(eager["net_peak_allocated_bytes"] * share / 100)
        part.run(name, lambda b=budget: llama1b_variant("eager", budget=b), seconds=UNIT_SECONDS["hf"] + 4)
    part.run("sdpa", lambda: llama1b_variant("sdpa"))


def part_liger(part: Part) -> None:
    for name, attention in (("sdpa+liger", "sdpa"), ("eager+liger", "eager")):  # the target's variant first
        if SMOKE:
            part.skip(name, SMOKE_SKIP["liger"])
            continue
        first = not part.results  # Triton compiles the kernels in its warm-up steps
        part.run(name, lambda a=attention: llama1b_variant(a, liger=True), seconds=25 if first else None)


# ---------------------------------------------------------------------------------------------------- Lightning fits
def lightning_pieces() -> tuple[type, type]:
    """A LightningModule around a Hugging Face causal LM, and the step timer (a callback, to be the first one)."""
    import lightning.pytorch as pl
    import torch

    class CausalLM(pl.LightningModule):
        def __init__(self, config: Any) -> None:
            super().__init__()
            self.model = build(config)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    class Timer(pl.Callback):
        """A mark at every batch start (as the first callback): a CUDA event recorded on the current stream (CPU:
        ``perf_counter``), no synchronisation between the timed steps; step ``i`` lasts from mark ``i`` to mark
        ``i + 1``. Synchronised wall clock at the first timed mark and the one after the last (their sum's check); the
        peaks from the first timed step on; what the fit ran with (engine, optimizer, allocator, clock)."""

        def __init__(self, memory: Memory | None, warmup: int, timed: int) -> None:
            self.memory, self.warmup, self.timed = memory, warmup, timed
            self.marks: list[Any] = []
            self.walls: list[float] = []
            self.info: dict[str, Any] = {}

        def on_train_start(self, trainer: Any, *_: Any) -> None:
            engine = trainer.strategy.model
            self.info.update(engine=type(engine).__name__, optimizer=type(getattr(engine, "optimizer", None)).__name__,
                             basic_optimizer=type(getattr(engine, "basic_optimizer", None)).__name__,
                             optimizer_module=type(trainer.optimizers[0]).__module__ if trainer.optimizers else None,
                             expandable_segments=expandable_segments_now(), clock_mhz_start=clock_mhz())

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == self.warmup and self.memory is not None:
                self.info["setup_peak_bytes"] = self.memory.read()[0]  # setup and warm-up steps
                self.memory.reset()
            if batch_idx in (self.warmup, self.warmup + self.timed):
                sync()
                self.walls.append(time.perf_counter())
            if SMOKE:
                self.marks.append(time.perf_counter())
            else:
                self.marks.append(torch.cuda.Event(enable_timing=True))
                self.marks[-1].record()

        def on_train_end(self, *_: Any) -> None:
            self.info["clock_mhz_end"] = clock_mhz()

        def step_times(self) -> list[float]:
            """The timed steps' durations, in seconds."""
            marks = self.marks[self.warmup : self.warmup + self.timed + 1]
            if SMOKE:
                return [b - a for a, b in itertools.pairwise(marks)]
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(marks)]

    return CausalLM, Timer


def fit(module: Any, strategy: Any, extra: list, memory: Memory | None, batch: int, seq: int, warmup: int,
        timed: int, logger: Any = False) -> dict:
    """One Lightning fit (bf16-mixed, 1 device) of ``warmup + timed + 1`` steps (the last one ends the timed ones);
    the statistics of the timed steps, and the steps themselves (``step_times_s``)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    _, timer_class = lightning_pieces()
    timer = timer_class(memory, warmup, timed)
    steps = warmup + timed + 1
    data = DataLoader(tokens(module.model.config.vocab_size, steps * batch, seq), batch_size=batch)
    trainer = pl.Trainer(accelerator=device(), devices=1, strategy=strategy, precision="bf16-mixed", max_steps=steps,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[timer, *extra])
    trainer.fit(module, data)
    engine = trainer.strategy.model
    if hasattr(engine, "destroy"):  # a DeepSpeed engine: MemOptStrategy lets go of it at teardown, Lightning's not
        from lightning_memopt.lightning.strategies._deepspeed_compat import release_engine

        release_engine(engine)
        ENGINES.append(weakref.ref(engine))
    times = timer.step_times()
    half = len(times) // 2
    out = {"batch": batch, "seq_len": seq, "warmup_steps": warmup, **spread(times),
           "timing": "perf_counter at batch starts" if SMOKE else "CUDA events at batch starts",
           "step_times_s": [round(t, 7) for t in times], "wall_timed_s": timer.walls[1] - timer.walls[0],
           "drift": statistics.median(times[half:]) / statistics.median(times[:half]) - 1 if half else 0.0}
    out["events_over_wall"] = sum(times) / out["wall_timed_s"]
    out.update(timer.info)
    zero = getattr(trainer.strategy, "config", None)
    if isinstance(zero, dict) and "zero_optimization" in zero:
        out["zero_optimization"] = json.loads(json.dumps(zero["zero_optimization"], default=str))
    return out


def lightning_strategy(stage: int, expandable: bool) -> Any:
    """Lightning's own ``DeepSpeedStrategy(stage=stage)``. ``expandable``: with the allocator's expandable segments for
    the fit, turned on and off where and as ``MemOptStrategy`` does (``setup_environment``, ``teardown``; the same
    helpers). With ``--smoke``, on a CPU stand-in: Lightning's class with DDP's environment setup in place of its CUDA
    check and a device rank for DeepSpeed (what ``MemOptStrategy`` does on CPU)."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    from lightning_memopt.lightning.strategies._deepspeed_compat import device_rank_for_deepspeed
    from lightning_memopt.lightning.strategies.allocator import expandable_segments_for_fit, restore_allocator

    if not SMOKE and not expandable:
        return DeepSpeedStrategy(stage=stage)

    class Lightning(DeepSpeedStrategy):
        restore: str | None = None

        def setup_environment(self) -> None:
            if SMOKE:
                DDPStrategy.setup_environment(self)
                return
            self.restore = expandable_segments_for_fit(True)  # before the model moves to the device
            super().setup_environment()

        def setup_distributed(self) -> None:
            if not SMOKE:
                super().setup_distributed()
                return
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, *args: Any) -> Any:
            if not SMOKE:
                return super()._setup_model_and_optimizer(*args)
            with device_rank_for_deepspeed(self.local_rank):  # a CPU device has no index for DeepSpeed
                return super()._setup_model_and_optimizer(*args)

        def teardown(self) -> None:
            super().teardown()
            restore_allocator(self.restore)
            self.restore = None

    return Lightning(stage=stage)


def zero_fit(arm: str, stage: int, warmup: int, timed: int) -> dict:
    """One fit of the zero protocol, from a state made and checked clean (:func:`clean_state`): ``arm`` is
    ``"memopt"`` (``MemOptStrategy(zero=stage)``, its defaults), ``"lightning"`` (``DeepSpeedStrategy(stage=stage)``)
    or ``"lightning+es"`` (the same with expandable segments)."""
    from lightning_memopt import MemOptStrategy

    state = clean_state()
    causal_lm, _ = lightning_pieces()
    memory = Memory()
    before = memory.current()
    module = causal_lm(zero_config())
    n = sum(p.numel() for p in module.parameters())
    memory.track(module)
    memory.reset()
    strategy = MemOptStrategy(zero=stage) if arm == "memopt" else lightning_strategy(stage, arm == "lightning+es")
    out = fit(module, strategy, [], memory, batch=size(4, 2), seq=size(1024, 64), warmup=warmup, timed=timed)
    allocated, reserved = memory.read()
    memory.close()
    planned = None if SMOKE else arm != "lightning"  # MemOptStrategy turns expandable segments on by default
    described = {"memopt": f"MemOptStrategy(zero={stage})", "lightning": f"DeepSpeedStrategy(stage={stage})",
                 "lightning+es": f"DeepSpeedStrategy(stage={stage}) + expandable segments"}[arm]  # fmt: skip
    described += " (CPU stand-in)" if SMOKE and arm != "memopt" else ""
    return {"arm": arm, "stage": stage, "strategy": described, "n_parameters": n,
            "state_before": state, "clean": state["clean"], **out,
            "allocator_as_planned": None if planned is None else out["expandable_segments"] == planned,
            "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved, "allocated_before_bytes": before,
            "net_peak_allocated_bytes": allocated - before}


def zero_fit_seconds(stage: int) -> float:
    """The planned seconds of one zero fit at ``stage`` on the GPU (``ZERO_FIT_S`` + its steps)."""
    return ZERO_FIT_S[stage] + (ZERO_WARMUP + ZERO_TIMED + 1) * ZERO_STEP_S[stage]


def part_zero(part: Part) -> None:
    """The zero protocol's rounds: one fit per (stage, arm) in a balanced order, while the part's time allows a
    whole round (the first round runs fit by fit as far as it can)."""
    warmup, timed = ZERO_SMOKE_STEPS if SMOKE else (ZERO_WARMUP, ZERO_TIMED)
    if not SMOKE:
        part.run("burn-in", burn_in, seconds=BURN_IN_S + 1)
    estimate = {s: zero_fit_seconds(s) for s in STAGES}
    sequence = [(stage, arm) for stage in STAGES for arm in ZERO_ARMS]
    first = True
    for r, order in enumerate(balanced_orders(sequence, ZERO_SMOKE_ROUNDS if SMOKE else ROUNDS)):
        need, left = sum(estimate[s] for s, _ in order), part.deadline - time.perf_counter()
        if r and not SMOKE and left < 1.05 * need:
            part.skip(f"round {r + 1}", f"a round needs ~{need:.0f} s, {left:.0f} s left")
            break
        walls: dict[int, list[float]] = {}
        for position, (stage, arm) in enumerate(order):
            record = part.run(f"r{r + 1} {arm}:{stage}", lambda a=arm, s=stage, p=position, n=r + 1: {
                "round": n, "position": p, **zero_fit(a, s, warmup, timed)}, seconds=estimate[stage])
            if record is not None and not first:  # the process's first fit pays its one-time costs
                walls.setdefault(stage, []).append(record["wall_s"])
            first = False
        estimate.update({s: max(w) for s, w in walls.items()})


def part_monitor(part: Part) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_memopt import MemoryMonitor

    causal_lm, _ = lightning_pieces()
    module = causal_lm(llama1b_config("sdpa"))
    log_dir = tempfile.mkdtemp(prefix="gpu_speed_monitor_")
    # its defaults (the point of the measurement), then without the OOM history (what recording it costs)
    variants = (("without MemoryMonitor", None), ("with MemoryMonitor()", {}),
                ("with MemoryMonitor(snapshot_on_oom=False)", {"snapshot_on_oom": False}),
                ("without MemoryMonitor", None))  # fmt: skip
    for i, (label, kwargs) in enumerate(variants):

        def one(k: dict | None = kwargs) -> dict:
            extra = [] if k is None else [MemoryMonitor(**k)]
            out = fit(module, "auto", extra, None, batch=1, seq=size(4096, 256), warmup=WARMUP,
                      timed=MONITOR_TIMED, logger=CSVLogger(log_dir))  # both with a logger (the monitor needs one)
            return {"monitor": k is not None, "monitor_kwargs": k, **out}

        part.run(f"{label} ({i + 1})", one)


PART_RUNNERS = {"zero": part_zero, "hf": part_hf, "liger": part_liger, "monitor": part_monitor}


def compat_allocator_variable() -> "list[str] | None":
    """``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF`` as set for this process (name, value), if either is."""
    from lightning_memopt.core import compat

    found = compat.allocator_variable()
    return None if found is None else list(found)


def child(name: str, records: Path, seconds: float) -> None:
    """The child process of part ``name``: an environment record, then one record per unit."""
    import torch

    warnings.filterwarnings("ignore")
    part = Part(name, records, seconds - (time.perf_counter() - STARTED) - 2)  # 2 s to exit
    env = {"name": "env", "status": "ok", "device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0),
           "torch": torch.__version__, "cuda": torch.version.cuda, "startup_s": round(time.perf_counter() - STARTED, 2),
           "allocator_variable": compat_allocator_variable()}
    part.emit(env)
    PART_RUNNERS[name](part)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- the parent
def run_part(name: str, timeout: float, scratch: Path) -> dict:
    """Run part ``name`` in a fresh process for at most ``timeout`` s; its records, and its status."""
    records = scratch / f"{name}.jsonl"
    cmd = [sys.executable, __file__, "--run", name, "--records", str(records), "--seconds", f"{timeout:.1f}"]
    cmd += ["--smoke"] if SMOKE else []
    cmd += ["--stages", *map(str, STAGES), "--rounds", str(ROUNDS)] if name == "zero" else []
    start = time.perf_counter()
    status, tail = "ok", ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
        if proc.returncode != 0:
            status, tail = f"failed (exit {proc.returncode})", proc.stderr[-2500:]
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {timeout:.0f} s"
        tail = (err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or "")[-2500:]
    lines = records.read_text().splitlines() if records.exists() else []
    units = [json.loads(line) for line in lines]
    out = {"part": name, "status": status, "wall_s": round(time.perf_counter() - start, 1),
           "timeout_s": round(timeout, 1), "units": units}
    if tail:
        out["stderr_tail"] = tail
    return out


def unit(results: dict, part: str, name: str) -> dict | None:
    """The record of an ok unit, else ``None``."""
    record = next((u for u in results.get(part, {}).get("units", []) if u["name"] == name), None)
    return record if record is not None and record["status"] == "ok" else None


def why_missing(results: dict, part: str, name: str) -> str:
    """Why unit ``name`` of ``part`` has no result (its status, or its part's)."""
    if part not in results:
        return f"{part} not run"
    record = next((u for u in results[part]["units"] if u["name"] == name), None)
    return f"{name}: {record['status'] if record else results[part]['status']}"


def target(label: str, value: float | None, op: str, threshold: float, missing: list[str] = ()) -> dict:
    passed = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    out = {"target": label, "value": value, "op": op, "threshold": threshold, "pass": passed}
    if value is None:
        out["missing"] = "; ".join(dict.fromkeys(missing)) or "not measured"
    return out


def compare(results: dict, label: str, a: tuple[str, str], b: tuple[str, str], key: str, op: str,
            threshold: float) -> dict:
    """Target ``unit a[key] / unit b[key] op threshold``, or why a side is missing."""
    x, y = unit(results, *a), unit(results, *b)
    value = x[key] / y[key] if x is not None and y is not None and y.get(key) else None
    missing = [why_missing(results, *side) for side, r in ((a, x), (b, y)) if r is None]
    return target(label, value, op, threshold, missing)


def zero_fits(results: dict) -> "dict[int, dict[int, dict[str, dict]]]":
    """The zero protocol's ok fits: ``{stage: {round: {arm: record}}}``."""
    out: dict[int, dict[int, dict[str, dict]]] = {}
    for u in results.get("zero", {}).get("units", []):
        if u["status"] == "ok" and "arm" in u:
            out.setdefault(u["stage"], {}).setdefault(u["round"], {})[u["arm"]] = u
    return out


def usable(record: dict) -> bool:
    """A fit that started clean, with the allocator setting of its arm."""
    return record["clean"] and record.get("allocator_as_planned") is not False


def zero_comparisons(results: dict) -> list[dict]:
    """Per stage and pair of arms (``COMPARISONS``): the rounds where both fits are usable, the ratio A / B with its
    95 % interval, and the verdict against ``TOLERANCE`` at ``PRECISION`` (:mod:`_timing`)."""
    out = []
    for stage, rounds in sorted(zero_fits(results).items()):
        for label, a, b in COMPARISONS:
            paired = [fits for _, fits in sorted(rounds.items()) if a in fits and b in fits]
            kept = [fits for fits in paired if usable(fits[a]) and usable(fits[b])]
            entry: dict[str, Any] = {"stage": stage, "comparison": label, "a": a, "b": b, "rounds": len(kept),
                                     "rounds_left_out": len(paired) - len(kept)}
            if kept:
                estimate = paired_ratio([f[a]["step_times_s"] for f in kept], [f[b]["step_times_s"] for f in kept])
                entry["verdict"], entry["pass"] = verdict(estimate, TOLERANCE, PRECISION)
                entry.update(estimate.to_dict())
            else:
                entry["verdict"], entry["pass"] = "not measured: no round with both fits usable", None
            if len(kept) < len(paired):  # what the rounds left out would have said (never the verdict)
                entry["ratio_all_rounds"] = paired_ratio([f[a]["step_times_s"] for f in paired],
                                                         [f[b]["step_times_s"] for f in paired]).ratio
            out.append(entry)
    return out


def targets(results: dict, comparisons: list[dict]) -> list[dict]:
    """Issue 18's targets as ratios, with pass/fail; ``None`` (and why) where a side is missing or the zero protocol
    is undecided."""
    out = []
    fits = zero_fits(results)
    why_zero = "zero not run" if "zero" not in results else f"zero: {results['zero']['status']}"
    for s in STAGES if "zero" in results else (1, 2, 3):
        for label, a, b in COMPARISONS[:2]:
            c = next((c for c in comparisons if c["stage"] == s and c["a"] == a and c["b"] == b), None)
            goal = target(f"ZeRO-{s}: {label} step time", None if c is None else c.get("ratio"), "<=", 1 + TOLERANCE,
                          [why_zero if c is None else c["verdict"]])
            if c is not None and "ratio" in c:
                goal.update({"pass": c["pass"], "ci": [c["low"], c["high"]], "rounds": c["rounds"],
                             "verdict": c["verdict"]})
                if c["pass"] is None:
                    goal["missing"] = c["verdict"]
            out.append(goal)
        peaks = {arm: [f[arm]["net_peak_allocated_bytes"] for f in fits.get(s, {}).values() if arm in f]
                 for arm in ("memopt", "lightning")}
        value = (statistics.median(peaks["memopt"]) / statistics.median(peaks["lightning"])
                 if peaks["memopt"] and peaks["lightning"] else None)
        why = [f"no ok {arm} fit at ZeRO-{s}" for arm, p in peaks.items() if not p] if s in fits else [why_zero]
        out.append(target(f"ZeRO-{s}: MemOptStrategy / DeepSpeedStrategy peak allocated (median over rounds)", value,
                          "<=", 1.01, why))
    sides = ("liger", "sdpa+liger"), ("hf", "eager")
    out.append(compare(results, "1B at 4096: SDPA + Liger / HF eager tokens/s", *sides, "tokens_per_s", ">=", 1.2))
    out.append(compare(results, "1B at 4096: SDPA + Liger / HF eager peak allocated", *sides,
                       "net_peak_allocated_bytes", "<=", 0.6))
    for share in (75, 50):
        name = f"eager+budget {share}%"
        budget = unit(results, "hf", name)
        within = None if budget is None else budget["net_peak_allocated_bytes"] / budget["budget_bytes"]
        out.append(target(f"budget checkpointing at {share} % of the eager peak: peak allocated / budget", within,
                          "<=", 1.0, [why_missing(results, "hf", name)]))
        if share == 75:
            out.append(compare(results, "budget checkpointing at 75 %: tokens/s / full checkpointing tokens/s",
                               ("hf", name), ("hf", "eager+checkpointing"), "tokens_per_s", ">=", 1.15))
    runs = [u for u in results.get("monitor", {}).get("units", []) if u["status"] == "ok" and "monitor" in u]
    without = [u["median_step_s"] for u in runs if not u["monitor"]]
    with_ = [u["median_step_s"] for u in runs if u["monitor"] and not u.get("monitor_kwargs")]  # the defaults
    overhead = with_[0] / statistics.mean(without) - 1 if with_ and without else None
    missing = [] if "monitor" in results else ["monitor not run"]
    missing += [f"{u['name']}: {u['status']}" for u in results.get("monitor", {}).get("units", [])
                if u["status"] != "ok"]
    out.append(target("MemoryMonitor() overhead: step with / without - 1", overhead, "<=", 0.01,
                      missing or [f"monitor: {results['monitor']['status']}"]))
    return out


def mfu(results: dict, record: dict) -> float | None:
    peak = unit(results, "hf", "matmul")
    if peak is None or "flops_per_token" not in record:
        return None
    return record["tokens_per_s"] * record["flops_per_token"] / (peak["tflops"] * 1e12)


def _gib(x: int | None) -> str:
    return "" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.2f} MiB"


def _step(r: dict) -> str:
    return f"{r['median_step_s'] * 1e3:.1f} ms (IQR {100 * r['iqr_rel']:.1f} %)"


def zero_tables(results: dict, comparisons: list[dict]) -> list[str]:
    """The zero protocol's tables: each arm over its rounds, the comparisons, and the fits that failed or were
    skipped."""
    warmup, timed = ZERO_SMOKE_STEPS if SMOKE else (ZERO_WARMUP, ZERO_TIMED)
    fits = zero_fits(results)
    rounds = max((len(r) for r in fits.values()), default=0)
    lines = [f"zero: 1 GPU, bf16-mixed, torch AdamW; {rounds} round(s) in balanced order; a fit: {warmup} warm-up +"
             f" {timed} timed steps, batch start to batch start",
             "| stage | arm | fits (clean) | median step: median of fits [range] | within-fit IQR | drift |"
             " peak allocated (net) | peak reserved | expandable segments |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, by_round in sorted(fits.items()):
        for arm in ZERO_ARMS:
            rs = [f[arm] for f in by_round.values() if arm in f]
            if not rs:
                continue
            med = [r["median_step_s"] * 1e3 for r in rs]

            def mid(key: str, rs: list = rs) -> float:
                return statistics.median(r[key] for r in rs)

            lines.append(f"| {stage} | {arm} | {len(rs)} ({sum(r['clean'] for r in rs)}) |"
                         f" {statistics.median(med):.1f} ms [{min(med):.1f}-{max(med):.1f}] |"
                         f" {100 * mid('iqr_rel'):.1f} % | {100 * mid('drift'):+.1f} % |"
                         f" {_gib(int(mid('net_peak_allocated_bytes')))} |"
                         f" {_gib(None if rs[0]['peak_reserved_bytes'] is None else int(mid('peak_reserved_bytes')))} |"
                         f" {'n/a' if rs[0]['expandable_segments'] is None else rs[0]['expandable_segments']} |")
    lines += ["", "zero: step-time ratios, 95 % confidence interval (Student's t over rounds or the steps' bootstrap,"
              " the wider)", "| stage | ratio | value | 95 % CI | rounds | per round | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        if "ratio" not in c:
            lines.append(f"| {c['stage']} | {c['comparison']} | | | 0 | | {c['verdict']} |")
            continue
        per_round = ", ".join(f"{x:.3f}" for x in c["per_round"])
        lines.append(f"| {c['stage']} | {c['comparison']} | {c['ratio']:.3f} | {c['low']:.3g}-{c['high']:.3g} |"
                     f" {c['rounds']} | {per_round} | {c['verdict']} |")
    others = [u for u in results["zero"]["units"][1:] if u["status"] != "ok"]
    if others:
        lines += ["", "| zero unit | status |", "|---|---|", *(f"| {u['name']} | {u['status']} |" for u in others)]
    return lines


def tables(results: dict, goals: list[dict], comparisons: list[dict]) -> str:
    """Markdown tables of every unit run, skipped or failed, of the zero protocol's comparisons and of the
    targets."""
    lines = []
    if "zero" in results:
        lines += zero_tables(results, comparisons)
    if "hf" in results or "liger" in results:
        lines += ["", "llama1b: Llama-3.2-1B shape, 1 x 4096, bf16 autocast, AdamW, plain loop",
                  "| variant | tokens/s | median step | peak allocated (net) | peak reserved | MFU | checkpointed |",
                  "|---|---|---|---|---|---|---|"]
        for part in ("hf", "liger"):
            for u in results.get(part, {}).get("units", [])[1:]:
                if u["name"] == "matmul":
                    if u["status"] == "ok":
                        lines.append(f"| bf16 matmul {u['n']}^3 | {u['tflops']:.4g} TFLOP/s (median) | | | | | |")
                    continue
                if u["status"] != "ok":
                    lines.append(f"| {u['name']} | {u['status']} | | | | | |")
                    continue
                m = mfu(results, u)
                plan = u.get("plan")
                ckpt = (f"{plan['num_checkpointed']}/{plan['num_blocks']} (budget {_gib(plan['budget'])})" if plan
                        else "all" if "checkpointing" in u["name"] else "none")
                share = "" if m is None else f"{100 * m:.1f} %"
                peaks = f"{_gib(u['net_peak_allocated_bytes'])} | {_gib(u['peak_reserved_bytes'])}"
                lines.append(f"| {u['name']} | {u['tokens_per_s']:,.0f} | {_step(u)} | {peaks} | {share} | {ckpt} |")
    if "monitor" in results:
        lines += ["", "monitor: Lightning fits of the 1B (sdpa), 1 x 4096", "| fit | median step |", "|---|---|"]
        for u in results["monitor"]["units"][1:]:
            lines.append(f"| {u['name']} | {_step(u) if u['status'] == 'ok' else u['status']} |")
    lines += ["", "targets (issue 18)", "| target | value | needs | pass |", "|---|---|---|---|"]
    for g in goals:
        value = "" if g["value"] is None else f"{g['value']:.3f}"
        value += f" [{g['ci'][0]:.3g}, {g['ci'][1]:.3g}]" if "ci" in g else ""
        mark = {True: "yes", False: "NO", None: g.get("missing", "")}[g["pass"]]
        lines.append(f"| {g['target']} | {value} | {g['op']} {g['threshold']} | {mark} |")
    return "\n".join(lines)


def versions() -> dict:
    out = {}
    for name in ("torch", "lightning", "transformers", "deepspeed", "liger-kernel", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def protocol() -> dict:
    """The zero protocol's settings, for the JSON."""
    warmup, timed = ZERO_SMOKE_STEPS if SMOKE else (ZERO_WARMUP, ZERO_TIMED)
    return {"stages": list(STAGES), "arms": list(ZERO_ARMS), "warmup_steps": warmup, "timed_steps": timed,
            "rounds_max": ZERO_SMOKE_ROUNDS if SMOKE else ROUNDS, "order": "as listed, then reversed, per round",
            "step": "batch start to the next batch start, CUDA events, no synchronisation between timed steps",
            "ratio": "geometric mean over rounds of median(A) / median(B)",
            "interval": "95 %, the wider of Student's t over rounds and a bootstrap of the steps within the fits",
            "tolerance": TOLERANCE, "precision": PRECISION, "clean_bytes": CLEAN_BYTES,
            "comparisons": [list(c) for c in COMPARISONS]}


def plan(parts: list[str], budget: float) -> dict:
    """The planned time: each part's share of ``budget`` (a later part gets more when an earlier one ends early) and
    the zero protocol's rounds, from the planning figures of the 2026-12-04 H200 runs."""
    left = budget - RESERVE_SECONDS
    shares = {p: left * PARTS[p] / sum(PARTS[q] for q in parts) for p in parts}
    out: dict[str, Any] = {"budget_seconds": budget, "shares_s": {p: round(v, 1) for p, v in shares.items()}}
    lines = [f"plan: {budget:.0f} s in all ({RESERVE_SECONDS} s kept for the files); parts and their shares: "
             + ", ".join(f"{p} {v:.0f} s" for p, v in shares.items())]
    if "zero" in shares:
        fit_s = {s: zero_fit_seconds(s) for s in STAGES}
        round_s = len(ZERO_ARMS) * sum(fit_s.values())
        fixed = ZERO_START_S + BURN_IN_S
        rounds = ZERO_SMOKE_ROUNDS if SMOKE else min(ROUNDS, max(0, int((shares["zero"] - 2 - fixed) // round_s)))
        for_4 = (fixed + 4 * round_s + 2) * sum(PARTS[p] for p in parts) / PARTS["zero"] + RESERVE_SECONDS
        out["zero"] = {"fit_s": fit_s, "round_s": round_s, "fixed_s": fixed, "rounds": rounds,
                       "seconds": fixed + rounds * round_s, "budget_for_4_rounds_s": round(for_4)}
        fits = ", ".join(f"ZeRO-{s} ~{v:.1f} s" for s, v in fit_s.items())
        if SMOKE:
            warmup, timed = ZERO_SMOKE_STEPS
            lines.append(f"  zero: --smoke: {rounds} rounds x {len(STAGES)} stage(s) x {len(ZERO_ARMS)} arms of toy"
                         f" fits ({warmup} + {timed} + 1 steps) on the CPU, not timed to plan")
        else:
            lines.append(f"  zero: start and burn-in ~{fixed} s + {rounds} round(s) x ~{round_s:.0f} s = ~"
                         f"{fixed + rounds * round_s:.0f} s of {shares['zero']:.0f} s ({len(STAGES)} stage(s) x"
                         f" {len(ZERO_ARMS)} arms; a fit {ZERO_WARMUP} + {ZERO_TIMED} + 1 steps: {fits})")
        if rounds == 0 and not SMOKE:
            lines.append("  zero: no whole round fits: round 1 runs fit by fit as far as it can (no verdict)")
        elif rounds < 4 and not SMOKE:
            spread_ = 100 * PRECISION * math.sqrt(rounds) / t_quantile_975(rounds - 1) if rounds > 1 else 0
            lines.append(f"  zero: with {rounds} round(s) a 2 % verdict needs the rounds' ratios to agree within a"
                         f" standard deviation of {spread_:.2f} % (0.63 % with 4 rounds)")
        if rounds < 4 and not SMOKE:
            alone = ZERO_START_S + BURN_IN_S + 4 * round_s + 2 + RESERVE_SECONDS
            lines.append(f"  zero: 4 rounds take --only zero --budget-seconds {math.ceil(alone)}"
                         + (f" (--budget-seconds {for_4:.0f} with these parts)" if len(parts) > 1 else ""))
    out["text"] = "\n".join(lines)
    return out


def selected(only: list[str] | None) -> list[str]:
    """The parts to run, in order, for ``--only`` names of groups or parts."""
    names = set(only or GROUPS)
    return [p for g, (_, parts) in GROUPS.items() for p in parts if g in names or p in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the groups and parts and exit (no GPU needed)")
    parser.add_argument("--only", nargs="+", choices=[*GROUPS, *[p for p in PARTS if p not in GROUPS]],
                        help="run only these groups or parts")
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_speed"), help="where the JSON files go")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="wall time for everything, in seconds")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes (not measurements)")
    parser.add_argument("--stages", nargs="+", type=int, choices=(1, 2, 3), default=[1, 2, 3],
                        help="the ZeRO stages of the zero protocol (default: 1 2 3)")
    parser.add_argument("--rounds", type=int, default=ZERO_ROUNDS,
                        help=f"the zero protocol's most rounds (default {ZERO_ROUNDS}; fewer if the budget ends first)")
    parser.add_argument("--run", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        total = sum(PARTS.values())
        for group, (description, parts) in GROUPS.items():
            shares = ", ".join(f"{p} ~{PARTS[p] / total:.0%}" for p in parts)
            print(f"{group:8s} {description} [parts: {shares} of the budget]")
        return 0
    import torch

    global SMOKE, STAGES, ROUNDS
    SMOKE, STAGES, ROUNDS = args.smoke, tuple(sorted(set(args.stages))), args.rounds
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_speed.py: expected a CUDA GPU, got none (torch.cuda.is_available() is False). Fix: run it on a"
              " machine with a GPU, or with --smoke for its code paths on the CPU; --list shows the groups.",
              file=sys.stderr)
        return 2
    if args.run:
        sys.path.insert(0, str(ROOT))  # this checkout's package
        child(args.run, args.records, args.seconds)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip the interpreter's teardown of CUDA, Triton and DeepSpeed state
    parts = selected(args.only)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_speed_"))
    planned = plan(parts, args.budget_seconds)
    print(planned["text"], flush=True)
    results: dict[str, dict] = {}
    for i, name in enumerate(parts):
        left = args.budget_seconds - (time.perf_counter() - STARTED) - RESERVE_SECONDS
        share = left * PARTS[name] / sum(PARTS[p] for p in parts[i:])
        if share < (5 if SMOKE else MIN_PART_SECONDS):
            results[name] = {"part": name, "status": f"skipped: the budget is spent ({left:.0f} s left)", "units": []}
        else:
            results[name] = run_part(name, share, scratch)
        print(f"{name}: {results[name]['status']} ({results[name].get('wall_s', 0):.0f} s of"
              f" {share:.0f} s; {time.perf_counter() - STARTED:.0f} s elapsed)", flush=True)
    comparisons = zero_comparisons(results)
    goals = targets(results, comparisons)
    text = tables(results, goals, comparisons)
    groups = {}
    for group, (description, group_parts) in GROUPS.items():
        ran = [results[p] for p in group_parts if p in results]
        if not ran:
            continue
        clean = all(r["status"] == "ok" and not any(u["status"].startswith("failed") for u in r["units"]) for r in ran)
        measured = any(u["status"] == "ok" and u["name"] != "env" for r in ran for u in r["units"])
        skipped = all(r["status"].startswith("skipped") for r in ran)
        groups[group] = "ok" if clean else "partly failed" if measured else "skipped" if skipped else "failed"
        payload = {"group": group, "description": description, "status": groups[group], "smoke": SMOKE,
                   "parts": ran}
        if group == "zero":
            payload.update(protocol=protocol(), comparisons=comparisons)
        (args.out_dir / f"{group}.json").write_text(json.dumps(payload, indent=1))
    env = next((u for r in results.values() for u in r["units"] if u["name"] == "env"), {})
    summary = {"device": env.get("device", "cpu (smoke)" if SMOKE else None), "smoke": SMOKE,
               "versions": {**versions(), "cuda": env.get("cuda")}, "budget_seconds": args.budget_seconds,
               "elapsed_s": round(time.perf_counter() - STARTED, 1), "plan": planned, "groups": groups,
               "parts": {n: {"status": r["status"], "wall_s": r.get("wall_s"), "timeout_s": r.get("timeout_s")}
                         for n, r in results.items()},
               "targets": goals, "zero_comparisons": comparisons, "tables": text}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"device: {summary['device']}; {summary['elapsed_s']:.0f} s in all\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
