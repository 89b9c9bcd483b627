"""Saved activation bytes of one forward, per transform: eager attention, SDPA, activation checkpointing.

A Hugging Face Llama built from a config (random weights) runs one forward + loss on CPU; every tensor autograd
saves for backward is counted once per storage (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded).
Beside it, the predictor's ``activations + logits`` for the same shape (``estimate_memory(..., engine="torch")``).
With checkpointing the predictor gives the backward peak: the block inputs kept in forward plus one block's
activations recomputed in its backward, so it is compared with ``measured + one block`` (one block = the saved
bytes of the model minus those of the same model with one layer fewer, same attention, no checkpointing).
The eager - SDPA difference is the ``s x s`` attention term (per layer: softmax probabilities and the dropout/
attention weights kept for backward, Korthikanti et al. 2022, "Reducing Activation Recomputation", Section 4.1).

    python benchmarks/activation_memory_by_transform.py --out activations.json
    python benchmarks/activation_memory_by_transform.py --seq-len 1024 --layers 8 --precision bf16-true
"""

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

CASES = (  # name, attention, checkpointing
    ("eager", "eager", False),
    ("sdpa", "sdpa", False),
    ("eager + checkpointing", "eager", True),
    ("sdpa + checkpointing", "sdpa", True),
)


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward + loss (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    return sum(seen.values())


def measure(args: argparse.Namespace) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_memopt import apply_activation_checkpointing, apply_attention, estimate_memory

    dtype = {"32-true": torch.float32, "bf16-true": torch.bfloat16}[args.precision]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, attention_dropout=0.0)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))

    def build(layers: int, attention: str, checkpointing: bool) -> nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config.__class__(**{**config.to_dict(), "num_hidden_layers": layers})).to(dtype)
        apply_attention(model.train(), attention)
        return apply_activation_checkpointing(model) if checkpointing else model

    rows, full = [], {}
    for name, attention, checkpointing in CASES:
        measured = saved_bytes(build(args.layers, attention, checkpointing), ids)
        compared = measured
        if checkpointing:
            compared += full[attention] - saved_bytes(build(args.layers - 1, attention, False), ids)
        else:
            full[attention] = measured
        est = estimate_memory(config, engine="torch", precision=args.precision, micro_batch_size=args.batch_size,
                              seq_len=args.seq_len, attention=attention, activation_checkpointing=checkpointing)
        predicted = est.activations + est.logits
        rows.append({"transform": name, "measured_bytes": measured, "compared_bytes": compared,
                     "predicted_bytes": predicted, "prediction_error": (predicted - compared) / compared})
    return rows


def table(rows: list[dict]) -> str:
    mib, base = 2**20, rows[0]["measured_bytes"]
    lines = [("| transform | saved in forward (measured) | vs eager | backward peak term (measured, + 1 block if ckpt)"
             " | predictor: activations + logits | error |"), "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['transform']} | {r['measured_bytes'] / mib:.2f} MiB | {r['measured_bytes'] / base:.2f}x | "
                     f"{r['compared_bytes'] / mib:.2f} MiB | {r['predicted_bytes'] / mib:.2f} MiB |"
                     f" {100 * r['prediction_error']:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=["32-true", "bf16-true"], default="32-true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = measure(args)
    print(f"Llama from config: hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, vocab {args.vocab};"
          f" batch {args.batch_size} x seq {args.seq_len}, {args.precision}, CPU")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
