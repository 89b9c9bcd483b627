"""Predicted vs measured ``max_memory_reserved`` of the GPU's ``zero`` rows (issue 16): MemOptStrategy, ZeRO 0-3.

    python benchmarks/deepspeed_reserved.py                       # writes benchmarks/results/deepspeed_reserved.json
    python benchmarks/deepspeed_reserved.py --out results.json

No GPU: the ``zero`` group's model of ``benchmarks/gpu_accuracy.py`` (its ``llama`` kind, micro-batch 2, bf16-mixed,
SDPA, torch's AdamW, ``MemOptStrategy(zero=s)`` at its defaults) is built on the meta device, one step is traced as
the predictor traces it for a CUDA device, and DeepSpeed's whole fit (initialisation and the steps) is replayed
through the simulated caching allocator (:func:`~lightning_memopt.predictor.deepspeed_allocations.replay_deepspeed`),
with expandable segments on and off. The measured values come from the committed H200 runs of 2026-12-04
(torch 2.11, CUDA 13, DeepSpeed 0.19.8): ``rerun/accuracy_zero_expandable.json`` (expandable segments, the
strategy's default since then) and ``accuracy_matrix.json`` (native segments). ``max_allocated`` there is the last
step's peak (the monitor resets the peak every step); ``max_reserved`` counts everything since the process started.
Nothing is fitted to these numbers.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "gpu_2026-12-04"
STEPS = 3


def measured() -> "dict[tuple[int, bool], dict[str, int]]":
    """(stage, expandable) -> the GPU's max_allocated (last step) and max_reserved (since process start)."""
    out = {}
    for path, expandable in ((RESULTS / "rerun" / "accuracy_zero_expandable.json", True),
                             (RESULTS / "accuracy_matrix.json", False)):  # fmt: skip
        for row in json.loads(path.read_text())["zero"]:
            if row.get("status") == "ok":
                out[(row["stage"], expandable)] = {"allocated": row["max_allocated"], "reserved": row["max_reserved"],
                                                   "monitor_predicted": row["predicted"]["allocated"]}  # fmt: skip
    return out


def model_and_batch() -> "tuple[Any, Any, Any]":
    """gpu_accuracy's ``zero`` model on the meta device, its source and one micro-batch of 2."""
    import gpu_accuracy
    import torch
    import transformers

    from lightning_memopt.predictor.sources import resolve_source
    from lightning_memopt.predictor.timeline import step_batch

    config, _ = gpu_accuracy.kind_config("llama")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
    source = resolve_source(model)
    batch, _ = step_batch(source, None, 2, gpu_accuracy.seq_len())
    return model, source, batch


def strategy_config(stage: int, model: Any) -> "dict[str, Any]":
    """The DeepSpeed config MemOptStrategy(zero=stage) runs with: its defaults, "auto" buckets sized to the model."""
    from lightning_memopt.core.deepspeed_config import BUCKET_KNOBS, build_deepspeed_config, resolve_bucket_sizes

    config = build_deepspeed_config(stage)
    resolve_bucket_sizes(config, model, dict.fromkeys(BUCKET_KNOBS, "auto"))
    return config


def step_peaks(events: "list[tuple]", settings: Any) -> "dict[str, int]":
    """Allocated and reserved peaks of the whole run and the last step's allocated peak (what the monitor reads)."""
    from lightning_memopt.predictor.cuda_allocator import CachingAllocatorSimulator

    sim = CachingAllocatorSimulator(settings)
    last = next(i for i, e in enumerate(events) if e[1][0] == "step" and e[1][1] == STEPS - 1)
    init_end = next(i for i, e in enumerate(events) if e[1][0] in ("step", "workspace"))
    step_peak = init_peak = init_reserved = 0
    for i, event in enumerate(events):
        if event[0] == "alloc":
            sim.malloc(event[1], int(event[2]))
        else:
            sim.free(event[1])
        if i < init_end:
            init_peak, init_reserved = max(init_peak, sim.allocated), max(init_reserved, sim.reserved)
        if i >= last:
            step_peak = max(step_peak, sim.allocated)
    return {"reserved": sim.peak_reserved, "allocated_since_start": sim.peak_allocated,
            "allocated_last_step": step_peak, "init_allocated": init_peak, "init_reserved": init_reserved}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deepspeed_reserved.json")
    args = parser.parse_args()

    from lightning_memopt.core.deepspeed_config import zero_settings
    from lightning_memopt.predictor.cuda_memory import cuda_rules
    from lightning_memopt.predictor.deepspeed_allocations import deepspeed_events, live_peak
    from lightning_memopt.predictor.precision import resolve_precision
    from lightning_memopt.predictor.timeline import recorded_trace
    from lightning_memopt.predictor.zero3 import Zero3Settings

    started = time.perf_counter()
    gpu = measured()
    model, source, batch = model_and_batch()
    precision = resolve_precision("bf16-mixed")
    rows, traces = [], {}
    for stage in range(4):
        config = strategy_config(stage, model)
        cfg = zero_settings(config)
        zero3: Any = False
        if stage == 3:
            zero3 = Zero3Settings(persistence_threshold=int(cfg["stage3_param_persistence_threshold"]),
                                  max_reuse_distance=int(cfg["stage3_max_reuse_distance"]),
                                  prefetch_bucket_size=int(cfg["stage3_prefetch_bucket_size"]),
                                  max_live_parameters=int(cfg["stage3_max_live_parameters"]),
                                  complete_trace=not source.reading.step_calls_root)  # fmt: skip
        key = stage == 3
        if key not in traces:
            traces[key] = recorded_trace(source, batch, precision=precision, engine="deepspeed", zero3=zero3,
                                         cuda=True, activation_checkpointing=None, attention=None,
                                         autocast_cache=False)  # fmt: skip
        for expandable in (True, False):
            rules = cuda_rules("NVIDIA H200", expandable_segments=expandable)
            events = deepspeed_events(traces[key], source.reading, zero=stage, precision=precision,
                                      optimizer="adamw-foreach", deepspeed_config=config, steps=STEPS,
                                      workspace_bytes=rules.workspace_bytes)  # fmt: skip
            sim = step_peaks(events, rules.allocator)
            real = gpu.get((stage, expandable), {})
            rows.append({"stage": stage, "expandable_segments": expandable, "predicted": sim,
                         "live_bytes_peak": live_peak(events)[0], "measured": real,
                         "reduce_bucket_size": cfg["reduce_bucket_size"]})  # fmt: skip
    print(
        f"{'stage':>5} {'expandable':>10} | {'reserved pred':>13} {'measured':>9} {'error':>7} |"
        f" {'alloc pred':>10} {'measured':>9} {'error':>7} | {'init alloc':>10}"
    )
    for r in rows:
        p, m = r["predicted"], r["measured"]

        def err(a: int, b: "int | None") -> str:
            return f"{(a - b) / b:+.1%}" if b else "n/a"

        print(
            f"{r['stage']:>5} {r['expandable_segments']!s:>10} | {p['reserved'] / 1e9:>11.3f}GB"
            f" {m.get('reserved', 0) / 1e9:>7.3f}GB {err(p['reserved'], m.get('reserved')):>7} |"
            f" {p['allocated_last_step'] / 1e9:>8.3f}GB {m.get('allocated', 0) / 1e9:>7.3f}GB"
            f" {err(p['allocated_last_step'], m.get('allocated')):>7} | {p['init_allocated'] / 1e9:>8.3f}GB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1), "steps": STEPS,
                                    "source": "benchmarks/deepspeed_reserved.py", "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
