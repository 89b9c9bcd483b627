"""How long a prediction takes: the analytic estimate of a 70B model, and the fake-tensor trace of a 7B shape.

Each case is timed ``--repeats`` times in this process after a first call that is reported apart (imports and
caches are in the first call only). The trace case builds the model on the meta device (not timed); the trace
then runs forward and backward on fake tensors (no real allocation).

    python benchmarks/estimate_speed.py --out estimate_speed.json
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

CASES = (  # name, model, method, keyword arguments
    ("llama-3-70b analytic, 64 GPUs ZeRO-3, 1 x 4096", "llama-3-70b", "analytic",
     {"world_size": 64, "zero": 3, "micro_batch_size": 1, "seq_len": 4096}),
    ("llama-3-70b analytic, + checkpointing, offload", "llama-3-70b", "analytic",
     {"world_size": 64, "zero": 3, "micro_batch_size": 1, "seq_len": 4096, "activation_checkpointing": True,
          "offload_optimizer": "cpu"}),
    ("llama-2-7b trace, 8 GPUs ZeRO-3, 1 x 2048", "llama-2-7b", "trace",
     {"world_size": 8, "zero": 3, "micro_batch_size": 1, "seq_len": 2048}),
)


def meta_model(preset: str):
    """The Hugging Face model of ``preset`` on the meta device (shapes only; the trace makes its own fakes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_memopt.predictor.presets import get_preset

    config = LlamaConfig(**{k: v for k, v in get_preset(preset).items() if k != "model_type"})
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def time_case(model: str, method: str, kwargs: dict, repeats: int) -> dict:
    import torch

    from lightning_memopt import estimate_memory

    if method == "trace":
        ids = torch.zeros(kwargs["micro_batch_size"], kwargs["seq_len"], dtype=torch.long)
        kwargs = {**kwargs, "example_batch": {"input_ids": ids, "labels": ids}}
        model = meta_model(model)

    start = time.perf_counter()
    est = estimate_memory(model, method=method, **kwargs)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        estimate_memory(model, method=method, **kwargs)
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "predicted_peak_bytes": est.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, model, method, kwargs in CASES:
        repeats = args.trace_repeats if method == "trace" else args.repeats
        rows.append({"case": name, "method": method, **time_case(model, method, kwargs, repeats)})
    print("| case | first call | median of repeats | repeats | predicted peak per rank |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['first_s'] * 1e3:.1f} ms | {r['median_s'] * 1e3:.1f} ms | {r['repeats']} | "
              f"{r['predicted_peak_bytes'] / 2**30:.2f} GiB |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
