"""Measure per-rank memory of real DeepSpeed training on CPU: peak live tensor bytes per step.

Two processes (torch.multiprocessing, gloo, 127.0.0.1, a free port) train tiny models with
``deepspeed.initialize`` over a matrix of ZeRO stage x precision x attention x checkpointing, 3 steps each,
and every rank records, per step, the peak and end-of-step live CPU tensor bytes counted by
:class:`lightning_memopt.measuring.memory.DeviceMemoryProbe` (the counting allocator is installed before
the model is built, so the model, DeepSpeed's flat buffers, fp32 partitions and Adam states are all
counted). All bytes are relative to the bytes alive before the model was built.

Models: a Hugging Face Llama, a Qwen2 with tied embeddings (both from configs, random weights), and a
plain-PyTorch pre-norm transformer defined here.

Usage::

    python benchmarks/measure_deepspeed.py --out ds_memory.json
    python benchmarks/measure_deepspeed.py --models llama --stages 0,3 --precisions bf16 --attention sdpa \
        --checkpointing off --cpu-mode dispatch
    python benchmarks/measure_deepspeed.py --overhead   # the probe's overhead on a one-process Llama step
"""

import argparse
import contextlib
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_memopt.measuring.memory import DeviceMemoryProbe, collect_garbage

VOCAB = 256


class PlainBlock(nn.Module):
    """A pre-norm transformer block in plain PyTorch (LayerNorm, MHA, GELU MLP)."""

    def __init__(self, hidden: int, heads: int, inner: int, attention: str) -> None:
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) / (h // self.heads) ** 0.5
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            a = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class PlainTransformer(nn.Module):
    """A decoder-only language model in plain PyTorch; ``forward(input_ids, labels)`` returns the loss."""

    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, inner: int = 128,
                 attention: str = "sdpa", checkpointing: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.blocks = nn.ModuleList(PlainBlock(hidden, heads, inner, attention) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, VOCAB, bias=False)
        self.checkpointing = checkpointing

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def build_model(name: str, attention: str, checkpointing: bool) -> nn.Module:
    """Build one of the benchmark models with random weights."""
    if name == "plain":
        return PlainTransformer(attention=attention, checkpointing=checkpointing)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)  # fmt: skip
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        raise ValueError(f"Expected a model in ('llama', 'qwen2', 'plain'), got {name!r}.")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def ds_config(stage: int, precision: str, micro_batch: int) -> dict:
    """A DeepSpeed config with small buckets (so buckets do not dwarf a tiny model)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 100_000,
            "allgather_bucket_size": 100_000,
            "stage3_prefetch_bucket_size": 100_000,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 100_000,
        },
        "steps_per_print": 10**9,
    }


def loss_of(engine: nn.Module, name: str, batch: torch.Tensor) -> torch.Tensor:
    if name == "plain":
        return engine(batch, batch)
    return engine(input_ids=batch, labels=batch).loss


def run_config(rank: int, probe: DeviceMemoryProbe, cfg: dict, steps: int) -> dict:
    """Train one configuration for ``steps`` steps; memory relative to the bytes alive before the model."""
    import deepspeed

    collect_garbage()
    base = probe.current_bytes
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["attention"], cfg["checkpointing"])
    n_params = sum(p.numel() for p in model.parameters())
    built = probe.current_bytes - base
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=ds_config(cfg["stage"], cfg["precision"], cfg["micro_batch"]))  # fmt: skip
    del model, optimizer
    after_init = probe.current_bytes - base
    generator = torch.Generator().manual_seed(rank)
    records = []
    for _ in range(steps):
        batch = torch.randint(0, VOCAB, (cfg["micro_batch"], cfg["seq_len"]), generator=generator)
        probe.start_step()
        loss = loss_of(engine, cfg["model"], batch)
        engine.backward(loss)
        engine.step()
        del loss
        step = probe.end_step()
        records.append({"peak": step.peak_bytes - base, "end": step.current_bytes - base, "rss": step.rss_bytes})
    engine.destroy()
    del engine, batch
    collect_garbage()
    return {**cfg, "rank": rank, "n_params": n_params, "built": built, "after_init": after_init,
            "steps": records, "leaked": probe.current_bytes - base}  # fmt: skip


def worker(rank: int, world_size: int, port: int, configs: list[dict], steps: int, cpu_mode: str,
           out_dir: str) -> None:  # fmt: skip
    probe = DeviceMemoryProbe("cpu", cpu_mode=cpu_mode)  # before anything is built: everything counts
    probe.start()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = []
    for cfg in configs:
        results.append(run_config(rank, probe, cfg, steps))
        if rank == 0:
            print(f"  done {describe(cfg)}", flush=True)
    probe.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def describe(cfg: dict) -> str:
    return (f"{cfg['model']:5s} zero{cfg['stage']} {cfg['precision']:4s} {cfg['attention']:5s} "
            f"ckpt={'on ' if cfg['checkpointing'] else 'off'}")  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_table(results: list[dict]) -> None:
    """One row per configuration and rank: per-step peak bytes, steady and peak bytes per parameter."""
    print(f"{'config':38s} rank  params  {'peak/step (KiB)':>26s}  {'end (KiB)':>9s}  B/param: steady  peak")
    for r in results:
        peaks = " ".join(f"{s['peak'] / 1024:8.1f}" for s in r["steps"])
        steady = r["steps"][-1]["end"] / r["n_params"]
        peak = max(s["peak"] for s in r["steps"]) / r["n_params"]
        print(f"{describe(r):38s} {r['rank']:4d} {r['n_params']:7d}  {peaks}  {r['steps'][-1]['end'] / 1024:9.1f}"
              f"  {steady:13.2f} {peak:5.2f}")  # fmt: skip


def measure_overhead(rounds: int, micro_batch: int, seq_len: int) -> dict:
    """Step time of a one-process bf16 Llama step with no probe, the allocator probe and the dispatch probe.

    The modes are interleaved step by step (the counting allocator is installed only for its own steps),
    and the minimum over rounds of this thread's CPU time (``time.thread_time``; torch runs with one thread)
    is compared, to resist noise from other processes sharing the cores.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, VOCAB, (micro_batch, seq_len))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    probes = {"none": None, "allocator": DeviceMemoryProbe("cpu", "allocator"),
              "dispatch": DeviceMemoryProbe("cpu", "dispatch")}  # fmt: skip
    for probe in probes.values():
        if probe is not None:
            probe.track(model, optimizer)
    CPUAllocationCounter.uninstall()
    times: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(rounds):
        for name, probe in probes.items():
            if name == "allocator":
                probe._counter._lib.lmo_install()
            start = time.thread_time()
            if probe is not None:
                probe.start_step()
            step()
            if probe is not None:
                probe.end_step()
            times[name].append(time.thread_time() - start)
            if name == "allocator":
                CPUAllocationCounter.uninstall()
            if name == "dispatch":
                probe.close()
    base = min(times["none"])
    summary = {name: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3,
                      "overhead_pct": (min(t) / base - 1) * 100} for name, t in times.items()}  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    print(f"Llama {params} params, batch {micro_batch}x{seq_len}, bf16 autocast, AdamW, 1 thread, {rounds} rounds,"
          " CPU time:")  # fmt: skip
    for name, s in summary.items():
        print(f"  {name:9s} min {s['min_ms']:7.1f} ms  median {s['median_ms']:7.1f} ms"
              f"  overhead {s['overhead_pct']:+.1f}%")  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama,qwen2,plain")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--attention", default="eager,sdpa")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--cpu-mode", default="allocator", choices=("allocator", "dispatch"))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overhead", action="store_true", help="measure the probe's overhead instead")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.overhead:
        summary = measure_overhead(args.rounds, args.micro_batch, args.seq_len)
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1))
        return
    # fmt: off
    configs = [
        {"model": m, "stage": int(s), "precision": p, "attention": a, "checkpointing": c == "on",
         "micro_batch": args.micro_batch, "seq_len": args.seq_len}
        for m, s, p, a, c in itertools.product(args.models.split(","), args.stages.split(","),
                                               args.precisions.split(","), args.attention.split(","),
                                               args.checkpointing.split(","))
    ]
    # fmt: on
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world_size, free_port(), configs, args.steps, args.cpu_mode, tmp),
                 nprocs=args.world_size, join=True)  # fmt: skip
        results = [r for rank in range(args.world_size) for r in json.loads(Path(tmp, f"rank{rank}.json").read_text())]
    results.sort(key=lambda r: (r["model"], r["stage"], r["precision"], r["attention"], r["checkpointing"], r["rank"]))
    print_table(results)
    print(f"{len(configs)} configurations x {args.world_size} ranks in {time.time() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
