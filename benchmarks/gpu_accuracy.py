"""The GPU accuracy matrix (issue 16): predicted vs what CUDA allocates, reserves and the device reports.

    python benchmarks/gpu_accuracy.py --out-dir DIR                 # everything, within --budget-seconds
    python benchmarks/gpu_accuracy.py --out-dir DIR --only matrix   # groups: probe, traces, matrix, zero
    python benchmarks/gpu_accuracy.py --smoke --out-dir DIR         # the same code on the CPU at toy sizes
    python benchmarks/gpu_accuracy.py --list

Groups, each in fresh child processes with a share of the budget (a group that fails or runs out of time is recorded
as such; the others still run):

- ``probe`` (alone on the GPU): the CUDA context (``mem_get_info`` used before the first allocation), the cuBLAS
  workspaces a matmul and a backward leave allocated (the forward thread and autograd's device thread each hold one),
  ``torch._fused_sdp_choice`` for each kind's attention shapes.
- ``matrix``: 8 model kinds of 0.2-0.35B parameters at 1024 tokens per sample (ViT: 1024 patches), eager / SDPA x
  checkpointing off / on x micro-batch 1 / 4, a plain loop in Lightning's order (forward, ``zero_grad``, backward,
  AdamW step; bf16 autocast without the weight-cast cache, as Lightning's ``MixedPrecision``). One child per kind,
  four kinds at a time (allocator statistics are per process; ``mem_get_info`` is not, so the device total is
  measured in ``probe`` and ``traces``, which run alone). Between two configurations of a child everything is freed
  and the allocated bytes checked against the child's baseline: ``leftover_bytes`` says what an earlier
  configuration left (0: nothing). Per configuration: the predictions from the module on the GPU and from the config
  alone (allocated, reserved, device), and per step the allocated bytes at its start, ``max_memory_allocated`` and
  ``max_memory_reserved``.
  The Llama rows run once more under ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (``expandable`` rows).
- ``zero``: ``Trainer(strategy=MemOptStrategy(zero=s))`` with ``MemoryMonitor()`` at its defaults, s = 0..3, one GPU:
  the monitor's per-step actual and predicted peaks and the allocator's own peaks.
- ``traces`` (alone on the GPU): whole runs from process start recorded with
  ``torch.cuda.memory._record_memory_history`` for the configurations named in :data:`TRACED`; compact JSON
  (allocator events with sizes, addresses and the innermost Python frames; the segments at the end) for the CPU
  tests that replay them.

Files written (at most 6): ``probe.json``, ``matrix.json`` (matrix + expandable + zero rows), ``summary.json``,
``trace_<name>.json.gz``.
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOKE = False

#: kind -> (config.json dict at GPU size, LoRA rank or None)
KINDS: "dict[str, tuple[dict[str, Any], int | None]]" = {
    "llama": (dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=2816,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                   max_position_embeddings=4096), None),
    "llama_lora": (dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024,
                        intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                        vocab_size=32000, max_position_embeddings=4096), 16),
    "mixtral": (dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=1024,
                     intermediate_size=1792, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                     num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096),
                None),
    "gemma3": (dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=1024,
                    intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=128, sliding_window=512, vocab_size=32000, max_position_embeddings=4096), None),
    "neox": (dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_size=1024,
                  intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16, rotary_pct=0.25,
                  vocab_size=50304, max_position_embeddings=4096), None),
    "t5": (dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=1024, d_kv=64, d_ff=2816,
                num_layers=8, num_decoder_layers=8, num_heads=16, vocab_size=32128, decoder_start_token_id=0,
                pad_token_id=0), None),
    "bert": (dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=16, num_attention_heads=16, vocab_size=30522, max_position_embeddings=1024),
             None),
    "vit": (dict(model_type="vit", architectures=["ViTForImageClassification"], hidden_size=1024,
                 intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16, image_size=512, patch_size=16,
                 num_labels=1000), None),
}
SMOKE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                   num_decoder_layers=2, num_heads=4, head_dim=16, sliding_window=16, image_size=32, patch_size=8,
                   num_labels=10, max_position_embeddings=256)  # fmt: skip
LORA_TARGETS = ["q_proj", "v_proj"]
SEQ_LEN, MICRO_BATCHES, STEPS = 1024, (1, 4), 3
#: configurations recorded from process start by ``traces``: kind:attention:checkpointing:micro-batch
TRACED = ("llama:sdpa:0:1", "llama:eager:1:4", "bert:sdpa:0:4")  # the last: reserved -5.4 % from the config (12-04)
GROUPS = {  # name: (description, share of the budget, runs alone on the GPU)
    "probe": ("CUDA context, cuBLAS workspaces, SDPA backend per kind", 0.06, True),
    "traces": ("whole-run allocator traces of " + ", ".join(TRACED), 0.22, True),
    "matrix": ("8 kinds x eager/sdpa x checkpointing x micro-batch 1/4: predicted vs allocated/reserved; the Llama"
               " rows again under expandable_segments:True", 0.57, False),
    "zero": ("MemOptStrategy(zero=0..3) + MemoryMonitor() on one GPU", 0.18, False),
}


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def kind_config(kind: str) -> "tuple[dict[str, Any], int | None]":
    config, lora = KINDS[kind]
    if SMOKE:
        config = {**config, **{k: v for k, v in SMOKE_SIZES.items() if k in config}}
    return dict(config), lora


def seq_len() -> int:
    return 32 if SMOKE else SEQ_LEN


def configurations(kind: str) -> "list[tuple[str, bool, int]]":
    return [(a, c, b) for a in ("eager", "sdpa") for c in (False, True) for b in MICRO_BATCHES]


# ------------------------------------------------------------------------------------------------ the measurements
def build(kind: str, attention: str, checkpointing: bool) -> Any:
    """The kind's model as a user builds it (``AutoConfig.for_model`` + its architecture class), random weights from
    seed 0, on the device, in training mode."""
    import torch
    import transformers

    config, lora = kind_config(kind)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    torch.manual_seed(0)
    with torch.device(device()):
        model = getattr(transformers, config["architectures"][0])._from_config(hf_config, attn_implementation=attention)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora, target_modules=LORA_TARGETS))
    if checkpointing:
        from lightning_memopt import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    return model.train()


def batch_for(model: Any, micro_batch: int) -> "dict[str, Any]":
    """A batch as the kind trains on it: token ids with labels (T5: labels of the same length), or images."""
    import torch

    config = getattr(model, "config", None) or model.base_model.model.config
    gen = torch.Generator().manual_seed(0)
    if getattr(config, "model_type", "") == "vit":
        size = config.image_size
        batch = {"pixel_values": torch.randn(micro_batch, 3, size, size, generator=gen),
                 "labels": torch.randint(0, config.num_labels, (micro_batch,), generator=gen)}
    else:
        ids = torch.randint(1, config.vocab_size, (micro_batch, seq_len()), generator=gen)
        batch = {"input_ids": ids, "labels": ids.clone()}
    return {k: v.to(device()) for k, v in batch.items()}


def predictions(kind: str, model: Any, batch: Any, attention: str, checkpointing: bool, micro_batch: int) -> dict:
    """The predictor's answer from the module on the device and from the config alone, with its CUDA rows."""
    from lightning_memopt import estimate_memory
    from lightning_memopt.predictor import predict

    config, lora = kind_config(kind)
    common = dict(engine="torch", precision="bf16-mixed", optimizer="adamw" if SMOKE else "adamw-foreach")
    import torch

    # the CUDA answer for this GPU, from the module on it and from the config alone
    target = {} if SMOKE else {"device": torch.cuda.get_device_name()}
    out: dict[str, Any] = {}
    for path in ("module", "config"):
        started = time.perf_counter()
        try:
            if path == "module":
                est = predict(model, example_batch=batch, **common, **target)
            else:
                image = config["model_type"] == "vit"
                est = estimate_memory(config, micro_batch_size=micro_batch, seq_len=None if image else seq_len(),
                                      attention=attention, activation_checkpointing=checkpointing, lora_rank=lora,
                                      lora_targets=LORA_TARGETS if lora else None, **common, **target)  # fmt: skip
            details = est.details or {}
            out[path] = {"allocated": est.total, "reserved": est.reserved, "device": est.device_total,
                         "seconds": round(time.perf_counter() - started, 2), "workspaces": est.workspaces,
                         "allocator_rounding": est.allocator_rounding,
                         "categories": {c: getattr(est, c) for c in ("parameters", "gradients", "optimizer_states",
                                                                      "activations", "logits", "buffers")},
                         "cuda": details.get("cuda")}  # fmt: skip
        except Exception as err:
            out[path] = {"error": f"{type(err).__name__}: {err}"[:600]}
    return out


def train(model: Any, batch: Any, steps: int = STEPS) -> "list[dict[str, int]]":
    """``steps`` plain bf16 AMP + AdamW steps in Lightning's order; per step the allocated bytes at its start and the
    allocator's peaks (reset at every step start). With ``--smoke``: the CPU's counting allocator."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    probe = None
    if SMOKE:
        from lightning_memopt.measuring.memory import DeviceMemoryProbe

        probe = DeviceMemoryProbe("cpu", cpu_mode="allocator")
        probe.start()
        probe.track(model, batch)
    for _ in range(steps):
        if probe is None:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            start = probe.current_bytes
            probe.start_step()
        with torch.autocast(device(), dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's MixedPrecision
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        del loss
        if probe is None:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            rows.append({"start": int(start), "allocated": int(torch.cuda.max_memory_allocated()),
                         "reserved": int(torch.cuda.max_memory_reserved()), "used": int(total - free)})
        else:
            step = probe.end_step()
            rows.append({"start": int(start), "allocated": step.peak_bytes, "reserved": None, "used": None})
    if probe is not None:
        probe.close()
    del optimizer
    return rows


def release() -> int:
    """Free what the last configuration left: collect, empty the cache; the bytes still allocated."""
    import torch

    from lightning_memopt.measuring.memory import collect_garbage

    collect_garbage()
    if SMOKE:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated())


def run_kind(kind: str, only: "list[tuple[str, bool, int]] | None" = None) -> dict:
    """Every configuration of ``kind`` in this process, each with what the ones before it left."""
    import torch

    torch.set_num_threads(4)
    rows, baseline = [], None
    for attention, checkpointing, micro_batch in only or configurations(kind):
        name = f"{kind}:{attention}:{int(checkpointing)}:{micro_batch}"
        row: dict[str, Any] = {"name": name, "kind": kind, "attention": attention, "checkpointing": checkpointing,
                               "micro_batch": micro_batch}
        started = time.perf_counter()
        try:
            left = release()
            baseline = left if baseline is None else baseline
            row["leftover_bytes"] = left - baseline
            model = build(kind, attention, checkpointing)
            batch = batch_for(model, micro_batch)
            row["n_parameters"] = sum(p.numel() for p in model.parameters())
            row["predicted"] = predictions(kind, model, batch, attention, checkpointing, micro_batch)
            row["steps"] = train(model, batch)
            del model, batch
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:800]
            if "out of memory" not in str(err):
                row["traceback"] = traceback.format_exc()[-1500:]
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("name", "seconds", "leftover_bytes", "error")}), flush=True)
    return {"kind": kind, "rows": rows}


def run_probe() -> dict:
    """The CUDA context, the cuBLAS workspaces and the SDPA backends, in a fresh process."""
    import torch

    if SMOKE:
        return {"smoke": True, "context_bytes": None}
    torch.cuda.init()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    import transformers

    # the model code decides the traced step: a replay on another machine (gpu_replay.py) needs the same version
    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "device": torch.cuda.get_device_name(0),
                           "capability": list(torch.cuda.get_device_capability(0)), "total_bytes": int(total),
                           "context_bytes": int(total - free)}  # fmt: skip
    for name in ("cublas_workspace_size", "cublaslt_workspace_size"):
        fn = getattr(torch.backends.cuda, name, None)
        out[name] = fn() if fn else None
    out["env"] = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE",
                                                  "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "PYTORCH_CUDA_ALLOC_CONF")}
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    base = torch.cuda.memory_allocated()
    y = x @ x
    del y
    torch.cuda.synchronize()
    out["forward_workspace_bytes"] = int(torch.cuda.memory_allocated() - base)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        y = torch.nn.functional.linear(x.float(), x.float())
    del y
    out["after_autocast_linear_bytes"] = int(torch.cuda.memory_allocated() - base)
    w = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    base2 = torch.cuda.memory_allocated()
    (x.float() @ w).sum().backward()
    torch.cuda.synchronize()
    out["backward_workspace_bytes"] = int(torch.cuda.memory_allocated() - base2 - w.grad.untyped_storage().nbytes())
    free, total = torch.cuda.mem_get_info()
    out["used_after_matmuls_bytes"] = int(total - free)
    out["reserved_after_matmuls_bytes"] = int(torch.cuda.memory_reserved())
    out["sdp_choice"] = {}
    for kind in KINDS:
        config, _ = kind_config(kind)
        heads = config.get("num_attention_heads") or config.get("num_heads")
        kv = config.get("num_key_value_heads", heads)
        dim = config.get("head_dim") or config.get("d_kv") or config.get("hidden_size", 1024) // heads
        q = torch.randn(1, heads, SEQ_LEN, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv, SEQ_LEN, dim, device="cuda", dtype=torch.bfloat16)
        try:
            choice = torch._fused_sdp_choice(q, k, k, is_causal=kind not in ("bert", "vit", "t5"),
                                             enable_gqa=kv != heads)  # fmt: skip
            out["sdp_choice"][kind] = int(choice)
        except Exception as err:
            out["sdp_choice"][kind] = repr(err)[:200]
    return out


def run_trace(name: str, out_dir: Path) -> dict:
    """One configuration from process start with the allocator's history recorded; a compact trace file."""
    import torch

    kind, attention, ckpt, micro = name.split(":")
    if not SMOKE:
        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    result = run_kind(kind, [(attention, bool(int(ckpt)), int(micro))])
    if SMOKE:
        return result
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)

    def frames(e: dict) -> "list[str]":
        return [f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in e.get("frames", [])[:6]]

    events = [{"a": e["action"], "s": e["size"], "addr": e["addr"], "stream": e.get("stream", 0), "f": frames(e)}
              for e in snap["device_traces"][0]]  # fmt: skip
    segments = [{"addr": s["address"], "s": s["total_size"], "alloc": s["allocated_size"],
                 "pool": s.get("segment_type"), "blocks": [{"s": b["size"], "state": b["state"]}
                                                           for b in s["blocks"]]} for s in snap["segments"]]
    free, total = torch.cuda.mem_get_info()
    result.update(trace_events=len(events), used_end=int(total - free), reserved_end=int(torch.cuda.memory_reserved()))
    safe = name.replace(":", "_")
    with gzip.open(out_dir / f"trace_{safe}.json.gz", "wt") as f:
        json.dump({"summary": result, "events": events, "segments": segments}, f)
    return result


def run_zero(stage: int) -> dict:
    """A Lightning fit under ``MemOptStrategy(zero=stage)`` with ``MemoryMonitor()`` at its defaults."""
    import tempfile

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from lightning_memopt import MemOptStrategy, MemoryMonitor

    config, _ = kind_config("llama")
    micro = 2

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            import transformers

            fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
            hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
            self.model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-5)

    torch.manual_seed(0)
    data = torch.randint(1, config["vocab_size"], (micro * 8, seq_len()))
    loader = torch.utils.data.DataLoader(data, batch_size=micro)
    monitor = MemoryMonitor(log_every_n_steps=1, plot=False)
    trainer = pl.Trainer(accelerator=device(), devices=1, strategy=MemOptStrategy(zero=stage), precision="bf16-mixed",
                         max_steps=6, logger=CSVLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])  # fmt: skip
    started = time.perf_counter()
    trainer.fit(Module(), loader)
    out = {"stage": stage, "seconds": round(time.perf_counter() - started, 1), "micro_batch": micro,
           "history": [{k: v for k, v in r.items() if not k.startswith("predicted/")} for r in monitor.history]}
    if not SMOKE:
        out.update(max_allocated=int(torch.cuda.max_memory_allocated()),
                   max_reserved=int(torch.cuda.max_memory_reserved()))
    est = monitor.estimate
    out["predicted"] = None if est is None else {"allocated": est.total, "reserved": est.reserved,
                                                 "device": est.device_total}
    return out


# ------------------------------------------------------------------------------------------------ the driver
def _child(args: "list[str]", timeout: float, env: "dict[str, str] | None" = None) -> "subprocess.Popen":
    cmd = [sys.executable, __file__, "--child", *args] + (["--smoke"] if SMOKE else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})  # fmt: skip


def _collect(procs: "list[tuple[str, subprocess.Popen]]", deadline: float) -> "list[dict]":
    results = []
    for label, proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append({"child": label, "status": "timed out", "stdout_tail": out[-1500:], "stderr": err[-1500:]})
            continue
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"child": label, "status": f"failed (rc {proc.returncode})", "stderr": err[-3000:]})
        else:
            results.append({"child": label, "status": "ok", **json.loads(lines[-1][len("RESULT "):])})
    return results


def _parallel(jobs: "list[tuple[str, list[str], dict | None]]", seconds: float, width: int) -> "list[dict]":
    deadline = time.perf_counter() + seconds
    results: list[dict] = []
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < width:
            label, args, env = pending.pop(0)
            running.append((label, _child(args, seconds, env)))
        if time.perf_counter() > deadline:
            for _, proc in running:
                proc.kill()
            results += [{"child": label, "status": "timed out"} for label, _ in running]
            results += [{"child": label, "status": "skipped: the group's budget is spent"} for label, _, _ in pending]
            break
        done = [(label, proc) for label, proc in running if proc.poll() is not None]
        for item in done:
            running.remove(item)
            results += _collect([item], deadline)
        time.sleep(0.2)
    return results


def rows_of(results: "list[dict]") -> "list[dict]":
    rows = []
    for r in results:
        rows += r.get("rows", []) or ([] if r.get("status") == "ok" else [{"name": r["child"], "error": r["status"],
                                                                          "stderr": r.get("stderr", "")[-800:]}])
    return rows


def error_table(rows: "list[dict]") -> "list[str]":
    """Markdown rows: predicted vs measured, allocated and reserved, module and config paths."""

    def pct(p: Any, m: Any) -> str:
        return "-" if not p or not m else f"{100 * (p - m) / m:+.1f} %"

    out = ["| configuration | leftover | start | max allocated | module | config | max reserved | predicted | error |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "steps" not in r:
            out.append(f"| {r.get('name')} | {r.get('error', '')[:80]} | | | | | | | |")
            continue
        last = r["steps"][-1]
        res = max(s["reserved"] or 0 for s in r["steps"]) or None
        mod, cfg = r["predicted"].get("module", {}), r["predicted"].get("config", {})
        out.append(f"| {r['name']} | {r.get('leftover_bytes', 0) / 2**20:.0f} MiB | {last['start'] / 2**30:.2f} GiB |"
                   f" {last['allocated'] / 2**30:.3f} GiB | {pct(mod.get('allocated'), last['allocated'])} |"
                   f" {pct(cfg.get('allocated'), last['allocated'])} |"
                   f" {'-' if res is None else format(res / 2**30, '.3f') + ' GiB'} |"
                   f" {'-' if not cfg.get('reserved') else format(cfg['reserved'] / 2**30, '.3f') + ' GiB'} |"
                   f" {pct(cfg.get('reserved'), res)} |")
    return out


def summarize(rows: "list[dict]") -> dict:
    """Median and worst errors against the targets of issue 16."""
    errs: dict[str, list[float]] = {"module_allocated": [], "config_allocated": [], "config_reserved": [],
                                    "config_vs_module": []}
    for r in rows:
        if "steps" not in r:
            continue
        allocated = r["steps"][-1]["allocated"]
        reserved = max(s["reserved"] or 0 for s in r["steps"])
        mod, cfg = r["predicted"].get("module", {}), r["predicted"].get("config", {})
        if mod.get("allocated"):
            errs["module_allocated"].append((mod["allocated"] - allocated) / allocated)
        if cfg.get("allocated"):
            errs["config_allocated"].append((cfg["allocated"] - allocated) / allocated)
            if mod.get("allocated"):
                errs["config_vs_module"].append((cfg["allocated"] - mod["allocated"]) / mod["allocated"])
        if cfg.get("reserved") and reserved:
            errs["config_reserved"].append((cfg["reserved"] - reserved) / reserved)
    out = {}
    for key, values in errs.items():
        if values:
            out[key] = {"n": len(values), "median_abs": statistics.median(abs(v) for v in values),
                        "worst_abs": max(abs(v) for v in values), "most_under": min(values)}
    return out


def main() -> int:
    global SMOKE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_accuracy"))
    parser.add_argument("--only", nargs="+", choices=list(GROUPS))
    parser.add_argument("--budget-seconds", type=float, default=300)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    SMOKE = args.smoke
    if args.list:
        for name, (text, share, alone) in GROUPS.items():
            print(f"{name:<11} {text} ({share:.0%} of the budget{', alone on the GPU' if alone else ''})")
        return 0
    if args.child:
        what, *rest = args.child
        if what == "kind":
            result = run_kind(rest[0])
        elif what == "probe":
            result = run_probe()
        elif what == "trace":
            result = run_trace(rest[0], Path(rest[1]))
        else:
            result = run_zero(int(rest[0]))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    if not SMOKE and not torch.cuda.is_available():
        print("gpu_accuracy.py: expected a CUDA GPU, got none. Fix: run it on a GPU machine, or pass --smoke.",
              file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    groups = args.only or list(GROUPS)
    results: dict[str, Any] = {"smoke": SMOKE, "budget_seconds": args.budget_seconds}
    for group in groups:
        seconds = args.budget_seconds * GROUPS[group][1] / sum(GROUPS[g][1] for g in groups)
        seconds = min(seconds, args.budget_seconds - (time.perf_counter() - started))
        t0 = time.perf_counter()
        if group == "probe":
            results["probe"] = _parallel([("probe", ["probe"], None)], seconds, 1)
        elif group == "traces":
            results["traces"] = _parallel([(n, ["trace", n, str(args.out_dir)], None) for n in TRACED], seconds, 1)
        elif group == "matrix":
            env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
            jobs = [(k, ["kind", k], None) for k in args.kinds] + [("expandable", ["kind", "llama"], env)]
            both = _parallel(jobs, seconds, 6)
            results["matrix"] = [r for r in both if r["child"] != "expandable"]
            results["expandable"] = [r for r in both if r["child"] == "expandable"]
        else:
            results["zero"] = _parallel([(f"zero{s}", ["zero", str(s)], None) for s in range(4)], seconds, 4)
        results.setdefault("seconds", {})[group] = round(time.perf_counter() - t0, 1)
        print(f"== {group}: {results['seconds'][group]} s", flush=True)
    matrix_rows = rows_of(results.get("matrix", []))
    expandable_rows = rows_of(results.get("expandable", []))
    (args.out_dir / "matrix.json").write_text(json.dumps({"matrix": matrix_rows, "expandable": expandable_rows,
                                                          "zero": results.get("zero", [])}, indent=1))  # fmt: skip
    if "probe" in results:
        (args.out_dir / "probe.json").write_text(json.dumps(results["probe"], indent=1))
    summary = {"smoke": SMOKE, "seconds": results.get("seconds"), "matrix": summarize(matrix_rows),
               "expandable": summarize(expandable_rows),
               "traces": [{k: v for k, v in r.items() if k != "rows"} for r in results.get("traces", [])]}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(error_table(matrix_rows)))
    if expandable_rows:
        print("expandable_segments:True")
        print("\n".join(error_table(expandable_rows)))
    for z in results.get("zero", []):
        print("zero", z.get("child"), z.get("status"), {k: z.get(k) for k in ("max_allocated", "max_reserved",
                                                                              "predicted", "seconds")})
    print(json.dumps(summary, indent=1))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
