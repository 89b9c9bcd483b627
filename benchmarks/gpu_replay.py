"""The committed GPU accuracy matrix re-predicted on a machine without a GPU: the predictor's CUDA answer from the
config alone, against what the H200 measured (``benchmarks/results/gpu_2026-12-04/accuracy_matrix.json``, written by
``gpu_accuracy.py``). The ground truth is the GPU's caching allocator; nothing here runs on a GPU.

    python benchmarks/gpu_replay.py                         # every row (minutes on 2 cores)
    python benchmarks/gpu_replay.py --kinds bert t5 --out replay.json

Prints a table (predicted vs measured ``max_memory_allocated`` and ``max_memory_reserved``) and writes JSON.

The traced step is the model code's: run it with the transformers version the GPU ran (``probe.json``'s
``transformers``; the 2026-12-04 run had 5.17.0, which its probe did not record), e.g. from a side install::

    pip install --target /tmp/tf517 transformers==5.17.0 "huggingface-hub>=1.5,<2" httpx
    PYTHONPATH=/tmp/tf517 python benchmarks/gpu_replay.py --out replay.json

Another version changes the model's tensors, not the predictor (Llama and Gemma 3 SDPA at micro-batch 4: -0.6 %
under 5.25, +0.2 % under 5.17).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_2026-12-04" / "accuracy_matrix.json"
#: the transformers version of a GPU run whose probe did not record it (the 2026-12-04 H200 run)
GPU_TRANSFORMERS = "5.17.0"


def replay(row: dict, device: str, expandable: bool) -> dict:
    """The config path's CUDA prediction for one measured row, and its errors."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_accuracy

    from lightning_memopt import estimate_memory

    config, lora = gpu_accuracy.KINDS[row["kind"]]
    image = config["model_type"] == "vit"
    started = time.perf_counter()
    est = estimate_memory(config, micro_batch_size=row["micro_batch"], seq_len=None if image else gpu_accuracy.SEQ_LEN,
                          attention=row["attention"], activation_checkpointing=row["checkpointing"], lora_rank=lora,
                          lora_targets=gpu_accuracy.LORA_TARGETS if lora else None, engine="torch",
                          precision="bf16-mixed", optimizer="adamw-foreach", device=device,
                          expandable_segments=expandable)  # fmt: skip
    allocated = row["steps"][-1]["allocated"]
    reserved = max(s["reserved"] for s in row["steps"])
    return {"name": row["name"], "expandable": expandable, "predicted_allocated": est.total,
            "measured_allocated": allocated, "allocated_error": (est.total - allocated) / allocated,
            "predicted_reserved": est.reserved, "measured_reserved": reserved,
            "reserved_error": (est.reserved - reserved) / reserved if est.reserved else None,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--kinds", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("gpu_replay.json"))
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    probe = json.loads((args.results.parent / "probe.json").read_text())[0]
    device = probe["device"]
    import transformers

    ran = probe.get("transformers", GPU_TRANSFORMERS)
    if transformers.__version__ != ran:
        print(f"warning: transformers {transformers.__version__} here, {ran} on the GPU: the rows compare two model"
              " codes (see the module docstring)", file=sys.stderr)
    rows = []
    for group, expandable in (("matrix", False), ("expandable", True)):
        for row in data[group]:
            if "steps" not in row or (args.kinds and row["kind"] not in args.kinds):
                continue
            rows.append(replay(row, device, expandable))
            r = rows[-1]
            print(f"| {r['name']}{' (expandable)' if expandable else ''} | {100 * r['allocated_error']:+.2f} % |"
                  f" {100 * r['reserved_error']:+.2f} % | {r['seconds']} s |", flush=True)
    summary = {}
    for key in ("allocated_error", "reserved_error"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = {"n": len(values), "median_abs": statistics.median(map(abs, values)),
                        "worst_abs": max(map(abs, values)), "most_under": min(values)}  # fmt: skip
    out = {"device": device, "transformers": transformers.__version__, "gpu_transformers": ran, "summary": summary,
           "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
