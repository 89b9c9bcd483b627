"""How long a prediction takes, from a config alone: large dense and MoE configs under ZeRO-3, and a plan.

Issue 17's targets (a warm process on 2 cores): a config-only estimate of each large config (llama-3-70b, a 72B
dense Qwen2, a ~400B MoE with 128 experts top-8, Qwen3-235B-A22B, DeepSeek-V3 671B) on 64 GPUs under ZeRO-3 at
1 x 4096 under 2 s each, and a ``plan`` over micro-batch x ZeRO x checkpointing x offload for the 70B under 10 s.
The 70B is also estimated for one H100 (the CUDA caching allocator replayed on the step's storages), under 2 s.
"Warm" means the imports are done and transformers' modeling code of each family is loaded: the script first
estimates a 2-layer model of each family (not timed). Each case's *first* call is what a user waits for (the model
is built on the meta device and traced at reduced depth: a few blocks, the others written out, DeepSpeed's ZeRO-3
events included); later calls reuse the build and the traces and are reported apart. The CPU time of the first
call is reported beside its wall time: on a shared machine it is the steadier of the two.

    python benchmarks/estimate_speed.py --out benchmarks/results/estimate_speed.json
"""

import argparse
import json
import os
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
ESTIMATE = "estimate, 64 GPUs ZeRO-3, 1 x 4096"
CASES = (  # name, model, keyword arguments (estimate) or None (plan)
    (f"llama-3-70b {ESTIMATE}", "llama-3-70b", RUN),
    # Qwen2.5-72B has Qwen2-72B's shape (qwen2 family: 80 layers, 8192 hidden, 29568 intermediate, 152064 vocab)
    (f"qwen2.5-72b (72B dense, Qwen2-72B's shape) {ESTIMATE}", "qwen2.5-72b", RUN),
    (f"~400B MoE (128 experts, top-8) {ESTIMATE}", MOE_400B, RUN),
    (f"qwen3-235b-a22b (235B MoE) {ESTIMATE}", "qwen3-235b-a22b", RUN),
    (f"deepseek-v3 (671B MoE) {ESTIMATE}", "deepseek-v3", RUN),
    ("llama-3-70b plan: micro-batch x ZeRO 0-3 x checkpointing x offload, 64 GPUs, 80 GiB, 4M tokens",
     "llama-3-70b", None),
    # the CUDA answer: the caching allocator replayed on every storage of the step, written out at full depth
    ("llama-3-70b estimate for one H100, plain torch, 1 x 4096 (allocator replayed)", "llama-3-70b",
     {"engine": "torch", "micro_batch_size": 1, "seq_len": 4096, "precision": "bf16-mixed", "device": "NVIDIA H100"}),
)
PLAN = {"device_memory": "80GiB", "world_size": 64, "seq_len": 4096, "global_batch_tokens": 4_000_000}
#: a 2-layer model of each family (warm-up): the fields that shrink it
SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
SMALL_BY_FAMILY = {
    "qwen3_moe": {"moe_intermediate_size": 64, "num_experts": 8, "head_dim": 64},
    "deepseek_v3": {"num_key_value_heads": 4, "moe_intermediate_size": 64, "n_routed_experts": 8, "n_group": 2,
                    "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 48,
                    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32},
}  # fmt: skip


def warm_up() -> None:
    """Import everything and load each family's modeling code with 2-layer models (not timed)."""
    from lightning_memopt import estimate_memory
    from lightning_memopt.predictor.read.presets import get_preset

    families = {}
    for _, model, _ in CASES:
        config = get_preset(model) if isinstance(model, str) else model
        families.setdefault(config["model_type"], config)
    for family, config in families.items():
        small = {**config, **SMALL, **SMALL_BY_FAMILY.get(family, {})}
        estimate_memory(small, **{**RUN, "seq_len": 64})


def run(model, kwargs) -> "tuple[float, float, object]":
    """``(wall seconds, CPU seconds of this process, result)`` of one call."""
    from lightning_memopt.planning import estimate_memory, plan_batch

    start, cpu = time.perf_counter(), time.process_time()
    result = estimate_memory(model, **kwargs) if kwargs is not None else plan_batch(model, **PLAN)
    return time.perf_counter() - start, time.process_time() - cpu, result


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
        first, first_cpu, result = run(model, kwargs)
        again = [run(model, kwargs)[0] for _ in range(args.repeats)]
        estimate = result if kwargs is not None else result.estimate
        details = estimate.details or {}
        rows.append({"case": name, "first_s": first, "first_cpu_s": first_cpu,
                     "median_again_s": statistics.median(again), "num_parameters": details.get("num_parameters"),
                     "traced_blocks": details.get("traced_blocks"), "blocks": details.get("blocks"),
                     "synthesis": details.get("synthesis"), "predicted_peak_bytes": estimate.total,
                     "peak_breakdown_bytes": {k: getattr(estimate, k) for k in ("parameters", "gradients",
                                              "optimizer_states", "activations", "logits", "buffers")},
                     "target_s": 10.0 if kwargs is None else 2.0})  # fmt: skip
    cpu = platform.processor() or platform.machine()
    print(f"warm-up (imports, 2-layer models of each family): {warm:.1f} s; {cpu}, {os.cpu_count()} cores")
    print("| case | parameters | blocks traced | first call (CPU) | again (median) | target | peak per rank |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        verdict = "met" if r["first_s"] < r["target_s"] else "MISSED"
        print(f"| {r['case']} | {r['num_parameters'] / 1e9:.1f}B | {r['traced_blocks']} of {r['blocks']} |"
              f" {r['first_s']:.2f} s ({r['first_cpu_s']:.2f} s) | {r['median_again_s'] * 1e3:.0f} ms |"
              f" < {r['target_s']:.0f} s ({verdict}) | {r['predicted_peak_bytes'] / 2**30:.1f} GiB |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "warm_up_s": warm, "cpu": cpu, "cores": os.cpu_count(),
                                        "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
