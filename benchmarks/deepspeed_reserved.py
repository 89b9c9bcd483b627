"""Predicted vs measured ``max_memory_reserved`` of the GPU's ``zero`` rows (issue 16): MemOptStrategy, ZeRO 0-3.

    python benchmarks/deepspeed_reserved.py                       # writes benchmarks/results/deepspeed_reserved.json
    python benchmarks/deepspeed_reserved.py --out results.json

No GPU: the ``zero`` group's model of ``benchmarks/gpu_accuracy.py`` (its ``llama`` kind, micro-batch 2, bf16-mixed,
SDPA, torch's AdamW, ``MemOptStrategy(zero=s)`` at its defaults) is built on the meta device and predicted for the H200
with ``estimate_memory(..., device="NVIDIA H200")``, expandable segments on and off: the pipeline replays DeepSpeed's
whole fit (initialisation and two steps) through the simulated caching allocator
(``lightning_memopt.predictor.account.deepspeed_allocations.replay_deepspeed``). The measured values come from the
committed H200 runs of 2026-12-04 (torch 2.11, CUDA 13, DeepSpeed 0.19.8): ``rerun/accuracy_zero_expandable.json``
(expandable segments, the strategy's default since then) and ``accuracy_matrix.json`` (native segments).
``max_allocated`` there is the last step's peak (the monitor resets the peak every step); ``max_reserved`` counts
everything since the process started. Nothing is fitted to these numbers.
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


def model_and_batch() -> "tuple[Any, Any]":
    """gpu_accuracy's ``zero`` model on the meta device and one micro-batch of 2."""
    import gpu_accuracy
    import torch
    import transformers

    from lightning_memopt.predictor.trace.batch import synthetic_batch

    config, _ = gpu_accuracy.kind_config("llama")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
    return model, synthetic_batch(model, 2, gpu_accuracy.seq_len())


def strategy_config(stage: int, model: Any) -> "dict[str, Any]":
    """The DeepSpeed config MemOptStrategy(zero=stage) runs with: its defaults, "auto" buckets sized to the model."""
    from lightning_memopt.core.deepspeed_config import BUCKET_KNOBS, build_deepspeed_config, resolve_bucket_sizes

    config = build_deepspeed_config(stage)
    resolve_bucket_sizes(config, model, dict.fromkeys(BUCKET_KNOBS, "auto"))
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deepspeed_reserved.json")
    args = parser.parse_args()

    from lightning_memopt import estimate_memory

    started = time.perf_counter()
    gpu = measured()
    model, batch = model_and_batch()
    rows = []
    for stage in range(4):
        config = strategy_config(stage, model)
        for expandable in (True, False):
            est = estimate_memory(model, example_batch=batch, zero=stage, precision="bf16-mixed",
                                  optimizer="adamw-foreach", deepspeed_config=config, device="NVIDIA H200",
                                  expandable_segments=expandable)  # fmt: skip
            real = gpu.get((stage, expandable), {})
            rows.append({"stage": stage, "expandable_segments": expandable, "measured": real,
                         "predicted": {"allocated": est.total, "reserved": est.reserved}})  # fmt: skip

    def err(a: "int | None", b: "int | None") -> str:
        return f"{(a - b) / b:+.1%}" if a and b else "n/a"

    print(f"{'stage':>5} {'expandable':>10} | {'reserved pred':>13} {'measured':>9} {'error':>7} |"
          f" {'alloc pred':>10} {'measured':>9} {'error':>7}")  # fmt: skip
    for r in rows:
        p, m = r["predicted"], r["measured"]
        print(f"{r['stage']:>5} {r['expandable_segments']!s:>10} | {(p['reserved'] or 0) / 1e9:>11.3f}GB"
              f" {m.get('reserved', 0) / 1e9:>7.3f}GB {err(p['reserved'], m.get('reserved')):>7} |"
              f" {p['allocated'] / 1e9:>8.3f}GB {m.get('allocated', 0) / 1e9:>7.3f}GB"
              f" {err(p['allocated'], m.get('allocated')):>7}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                                    "source": "benchmarks/deepspeed_reserved.py", "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
