"""The ``predictor_families`` check of ``gpu_checks.py``: the predictor on families it has no formula for, on a GPU.

For each family (dense GQA, LoRA on a frozen base, two MoE routers, sliding-window attention, an encoder-decoder,
a masked LM, a vision classifier) a model is built from a small config with random weights on the device and
trained three steps in Lightning's order (forward, ``zero_grad``, backward, AdamW step) under bf16 autocast; the
last step's ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``, what the caching allocator held) is
compared with two predictions:

* ``module``: ``predict(model, example_batch=...)`` of the model on the GPU (the trace runs CUDA's kernels and
  autocast rules: what ``MemoryMonitor`` predicts in a GPU run);
* ``config``: ``estimate_memory(config, ...)`` from the config alone (built on the meta device, traced on the CPU:
  what the CLI answers before any GPU is rented).

With ``--smoke`` the same code runs on the CPU at toy sizes (live tensors measured by a dispatch probe).
"""

from typing import Any

#: family -> (config at GPU size, overrides at smoke size, LoRA rank or None)
FAMILIES: "dict[str, tuple[dict, dict, int | None]]" = {
    "llama (dense, GQA)": (
        dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000), {}, None),
    "llama + LoRA r16": (
        dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000), {}, 16),
    "mixtral (MoE top-2)": (
        dict(model_type="mixtral", hidden_size=768, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=12,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000), {}, None),
    "qwen3_moe (MoE top-8)": (
        dict(model_type="qwen3_moe", hidden_size=768, intermediate_size=2048, moe_intermediate_size=256,
             num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=32,
             num_experts_per_tok=8, vocab_size=32000),
        dict(moe_intermediate_size=32, num_experts=8, head_dim=16), None),
    "gemma3_text (sliding window)": (
        dict(model_type="gemma3_text", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, head_dim=128, sliding_window=128, vocab_size=32000),
        dict(head_dim=16, sliding_window=16), None),
    "t5 (encoder-decoder)": (
        dict(model_type="t5", d_model=768, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=12,
             vocab_size=32128, decoder_start_token_id=0, pad_token_id=0), dict(d_kv=16, d_ff=128), None),
    "bert (masked LM)": (
        dict(model_type="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
             vocab_size=30522, architectures=["BertForMaskedLM"]), {}, None),
    "vit (image classification)": (
        dict(model_type="vit", hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
             image_size=224, patch_size=16, num_labels=1000, architectures=["ViTForImageClassification"]),
        dict(image_size=32, patch_size=8, num_labels=10), None),
}
SMOKE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   moe_intermediate_size=64)  # fmt: skip


def _config(name: str, smoke: bool) -> "tuple[dict, int | None]":
    config, small, lora = FAMILIES[name]
    if smoke:
        config = {**config, **{k: v for k, v in SMOKE_SIZES.items() if k in config}, **small}
    return config, lora


def _measure(model: Any, batch: dict, device: str, memory: Any, steps: int = 3) -> "tuple[int, int | None]":
    """The last step's peak (allocated) and, on CUDA, the caching allocator's peak reserved bytes."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    memory.track(model, batch)  # the batch is on the device through the step, as the trace counts it
    peak = 0
    for _ in range(steps):
        memory.reset()
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's MixedPrecision
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        peak = memory.peak()
        del loss
    return peak, (int(torch.cuda.max_memory_reserved()) if device == "cuda" else None)


def check_predictor_families(smoke: bool, memory_factory: Any) -> dict:
    """Measured vs predicted (module on the device, config alone) per family; see the module docstring."""
    import torch

    from lightning_memopt import estimate_memory
    from lightning_memopt.predictor import predict
    from lightning_memopt.predictor.sources import _build, synthetic_batch

    device = "cpu" if smoke else "cuda"
    optimizer = "adamw" if smoke else "adamw-foreach"  # torch's AdamW default on each device
    micro_batch, seq_len = (2, 32) if smoke else (4, 512)
    rows = []
    for name in FAMILIES:
        config, lora = _config(name, smoke)
        torch.manual_seed(0)
        meta = _build(config)
        with torch.device(device):
            model = type(meta)._from_config(meta.config).train()
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora, target_modules=["q_proj", "v_proj"]))
        image = model.main_input_name == "pixel_values"
        batch = synthetic_batch(model, micro_batch, None if image else seq_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        common = dict(engine="torch", precision="bf16-mixed", optimizer=optimizer)
        from_module = predict(model, example_batch=batch, **common).total
        from_config = estimate_memory(config, micro_batch_size=micro_batch, seq_len=None if image else seq_len,
                                      lora_rank=lora, lora_targets=["q_proj", "v_proj"] if lora else None,
                                      **common).total  # fmt: skip
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
        measured, reserved = _measure(model, batch, device, memory_factory())
        rows.append({"family": name, "n_parameters": sum(p.numel() for p in model.parameters()),
                     "measured_bytes": measured, "reserved_bytes": reserved, "module_bytes": from_module,
                     "config_bytes": from_config,
                     "module_error": (from_module - measured) / measured,
                     "config_error": (from_config - measured) / measured})  # fmt: skip
        del model, batch
        if not smoke:
            torch.cuda.empty_cache()
    return {"rows": rows, "micro_batch": micro_batch, "seq_len": seq_len}


def table(result: dict) -> "list[str]":
    """The check's table (markdown lines)."""
    out = ["predictor_families (bf16 autocast + AdamW, Lightning's order; error = predicted / measured - 1)",
           "| family | parameters | max allocated | max reserved | module on device | error | config only | error |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        reserved = "n/a" if r["reserved_bytes"] is None else f"{r['reserved_bytes'] / 2**20:.1f} MiB"
        out.append(f"| {r['family']} | {r['n_parameters'] / 1e6:.1f}M | {r['measured_bytes'] / 2**20:.1f} MiB |"
                   f" {reserved} |"
                   f" {r['module_bytes'] / 2**20:.1f} MiB | {100 * r['module_error']:+.1f} % |"
                   f" {r['config_bytes'] / 2**20:.1f} MiB | {100 * r['config_error']:+.1f} % |")
    return out
