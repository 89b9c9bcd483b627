"""How long a prediction takes, from a config alone: a 70B dense model, a ~400B-parameter MoE, and a plan.

Issue 10's targets (a warm process on 2 cores): a config-only estimate of a 70B dense config and of a ~400B MoE
config (128 experts, top-8) under 2 s each, and a ``plan`` over micro-batch x ZeRO x checkpointing for the 70B under
10 s. "Warm" means the imports are done and transformers' modeling code of the family is loaded: the script first
estimates a 2-layer model of each family (not timed). Each case's *first* call is what a user waits for (the model
is built on the meta device and traced at reduced depth); later calls reuse the build and the traces and are
reported apart.

    python benchmarks/estimate_speed.py --out estimate_speed.json
"""

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

#: ~397B parameters: 96 layers, 128 experts of 2048, top-8 (Qwen3-MoE's architecture, scaled)
MOE_400B = {
    "model_type": "qwen3_moe", "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 2048,
    "num_hidden_layers": 96, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}  # fmt: skip
RUN = {"world_size": 64, "zero": 3, "micro_batch_size": 1, "seq_len": 4096, "precision": "bf16-mixed"}
CASES = (  # name, model, keyword arguments (estimate) or None (plan)
    ("llama-3-70b estimate, 64 GPUs ZeRO-3, 1 x 4096", "llama-3-70b", RUN),
    ("~400B MoE (128 experts, top-8) estimate, 64 GPUs ZeRO-3, 1 x 4096", MOE_400B, RUN),
    ("llama-3-70b plan: micro-batch x ZeRO 0-3 x checkpointing x offload, 64 GPUs, 80 GiB, 4M tokens",
     "llama-3-70b", None),
)
PLAN = {"device_memory": "80GiB", "world_size": 64, "seq_len": 4096, "global_batch_tokens": 4_000_000}


def warm_up() -> None:
    """Import everything and load the families' modeling code with 2-layer models (not timed)."""
    from lightning_memopt import estimate_memory
    from lightning_memopt.predictor.presets import get_preset

    for config in (get_preset("llama-3-70b"), MOE_400B):
        small = {**config, "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
        if "moe_intermediate_size" in small:
            small.update(moe_intermediate_size=64, num_experts=8, head_dim=64)
        estimate_memory(small, **{**RUN, "seq_len": 64})


def run(model, kwargs) -> "tuple[float, object]":
    from lightning_memopt.planning import estimate_memory, plan_batch

    start = time.perf_counter()
    result = estimate_memory(model, **kwargs) if kwargs is not None else plan_batch(model, **PLAN)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls after the first, per case")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    warm_up()
    warm = time.perf_counter() - start
    rows = []
    for name, model, kwargs in CASES:
        first, result = run(model, kwargs)
        again = [run(model, kwargs)[0] for _ in range(args.repeats)]
        estimate = result if kwargs is not None else result.estimate
        details = estimate.details or {}
        rows.append({"case": name, "first_s": first, "median_again_s": statistics.median(again),
                     "num_parameters": details.get("num_parameters"), "traced_blocks": details.get("traced_blocks"),
                     "blocks": details.get("blocks"), "predicted_peak_bytes": estimate.total,
                     "target_s": 10.0 if kwargs is None else 2.0})  # fmt: skip
    cpu = platform.processor() or platform.machine()
    print(f"warm-up (imports, 2-layer models of each family): {warm:.1f} s; {cpu}")
    print("| case | parameters | blocks traced | first call | again (median) | target | peak per rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        verdict = "met" if r["first_s"] < r["target_s"] else "MISSED"
        print(f"| {r['case']} | {r['num_parameters'] / 1e9:.1f}B | {r['traced_blocks']} of {r['blocks']} |"
              f" {r['first_s']:.2f} s | {r['median_again_s'] * 1e3:.0f} ms | < {r['target_s']:.0f} s ({verdict}) |"
              f" {r['predicted_peak_bytes'] / 2**30:.1f} GiB |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "warm_up_s": warm}, indent=2))


if __name__ == "__main__":
    main()
