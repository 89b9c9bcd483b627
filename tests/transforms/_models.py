"""Tiny models and a saved-activation meter shared by the transform tests (and the docs table)."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # also in processes the tests spawn
from plain_transformer import PlainBlock  # the plain family, shared with the accuracy benchmark


def hf_config(kind: str, layers: int = 2, **overrides):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    kwargs = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_dropout": 0.0,
    }
    kwargs.update(overrides)
    return cls[kind](**kwargs)


def hf_model(kind: str, layers: int = 2, attn: str = "eager", seed: int = 0, **overrides):
    import transformers

    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }
    torch.manual_seed(seed)
    config = hf_config(kind, layers, **overrides)
    config._attn_implementation = attn
    return cls[kind](config).train()


class PlainLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([PlainBlock(d, heads, attention="eager") for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def plain_model(layers: int = 2, seed: int = 0, **kw) -> PlainLM:
    torch.manual_seed(seed)
    return PlainLM(layers=layers, **kw).train()


def make(kind: str, layers: int = 2, **kw) -> nn.Module:
    """A tiny model of ``kind`` (``"plain"`` or a Hugging Face family; eager attention)."""
    return plain_model(layers=layers, **kw) if kind == "plain" else hf_model(kind, layers=layers, **kw)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, PlainLM):
        logits = model(ids)
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward (de-duplicated by storage, parameters
    excluded)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids)
    del loss
    return sum(seen.values())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_storage_sizes(model: nn.Module, ids: torch.Tensor) -> list[int]:
    """Sizes in bytes of the distinct non-parameter storages autograd keeps during one forward."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in param_storages:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, ids)
    del loss
    return sorted(seen.values(), reverse=True)


def _table(layers: int = 4, batch: int = 2, seq: int = 256) -> None:  # pragma: no cover - docs table
    """Print the saved-activation table of docs/transforms.md: ``python tests/transforms/_models.py``."""
    import sys

    sys.path.insert(0, ".")
    import warnings

    from lightning_memopt.transforms import apply_activation_checkpointing, apply_attention

    warnings.simplefilter("ignore")
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))

    def make(kind, n):
        return plain_model(layers=n) if kind == "plain" else hf_model(kind, layers=n)

    mib = 2**20
    print(f"batch {batch}, seq {seq}, hidden 64, 4 heads, {layers} blocks, fp32; saved activation MiB")
    print(
        "| model | eager | eager + full ckpt | ckpt: % of ideal reduction | eager + half ckpt | sdpa "
        "| eager - sdpa | L x (b h s^2 x 4 B) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("llama", "qwen2", "mistral", "plain"):
        none, two = saved_bytes(make(kind, layers), ids), saved_bytes(make(kind, 2), ids)
        per_block = (none - two) / (layers - 2)
        ideal = layers * (per_block - ids.numel() * 64 * 4)
        full = saved_bytes(apply_activation_checkpointing(make(kind, layers)), ids)
        half = saved_bytes(apply_activation_checkpointing(make(kind, layers), fraction=0.5), ids)
        sdpa = saved_bytes(apply_attention(make(kind, layers), "sdpa"), ids)
        s_term = layers * batch * 4 * seq * seq * 4
        print(
            f"| {kind} | {none / mib:.2f} | {full / mib:.2f} | {100 * (none - full) / ideal:.1f} % | "
            f"{half / mib:.2f} | {sdpa / mib:.2f} | {(none - sdpa) / mib:.2f} | {s_term / mib:.2f} |"
        )


if __name__ == "__main__":
    _table()
