"""The micro-batch a step is traced on: the user's example batch resized to the micro-batch asked for, or a batch of
random values shaped as a Hugging Face model trains on (:func:`synthetic_batch`), and the ``(micro-batch, seq_len)``
of a batch (:func:`batch_shape`)."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_memopt.core.modules import find_hf_model


def batch_shape(batch: Any) -> "tuple[int, int | None] | None":
    """``(micro-batch size, sequence length)`` of a batch: the first tensor with a batch dimension in it (``input_ids``
    first in a mapping); ``None`` when the batch holds no tensor.

    Example:
        >>> batch_shape({"input_ids": torch.zeros(4, 64), "labels": torch.zeros(4, 64)})
        (4, 64)
        >>> batch_shape([torch.zeros(8)])
        (8, None)
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return None
        return int(batch.shape[0]), (int(batch.shape[1]) if batch.dim() >= 2 else None)
    if isinstance(batch, Mapping):
        items = [batch["input_ids"]] if "input_ids" in batch else []
        items += list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        shape = batch_shape(item)
        if shape is not None:
            return shape
    return None


def resize_batch(batch: Any, size: int, micro_batch_size: int) -> Any:
    """``batch`` with ``micro_batch_size`` samples: every tensor whose first dimension is ``size`` gets its rows
    repeated (or cut) to ``micro_batch_size``; other leaves stay.

    Example:
        >>> resize_batch({"x": torch.arange(4).view(2, 2), "n": 7}, 2, 3)["x"].tolist()
        [[0, 1], [2, 3], [0, 1]]
    """
    from torch.utils._pytree import tree_map

    index = torch.arange(micro_batch_size) % size

    def resize(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size:
            return x[index.to(x.device)] if x.device.type != "meta" else x.new_empty((micro_batch_size, *x.shape[1:]))
        return x

    return tree_map(resize, batch)


def step_batch(
    module: nn.Module, example_batch: Any, micro_batch_size: "int | None", seq_len: "int | None"
) -> "tuple[Any, tuple[int, int | None]]":
    """The micro-batch a step is traced on and its ``(micro-batch, seq_len)``: ``example_batch`` resized to
    ``micro_batch_size``, or a synthetic batch of the model's inputs.

    Raises:
        ValueError: a ``seq_len`` that contradicts ``example_batch``, or a model whose inputs are unknown without one.
    """
    if example_batch is not None:
        shape = batch_shape(example_batch) or (micro_batch_size or 1, seq_len)
        if seq_len is not None and shape[1] is not None and seq_len != shape[1]:
            raise ValueError(
                f"Expected `seq_len` to match example_batch ({shape[1]}), got {seq_len}. Fix: drop `seq_len` (the batch"
                " says it) or pass a batch of that length."
            )
        if micro_batch_size is not None and micro_batch_size != shape[0]:
            example_batch, shape = resize_batch(example_batch, shape[0], micro_batch_size), (micro_batch_size, shape[1])
        return example_batch, shape
    micro = micro_batch_size or 1
    batch = synthetic_batch(module, micro, seq_len)
    return batch, batch_shape(batch) or (micro, seq_len)


def synthetic_batch(module: nn.Module, micro_batch_size: int, seq_len: "int | None") -> "dict[str, torch.Tensor]":
    """One micro-batch of the shape a Hugging Face model trains on, with random values: token ids and labels for
    language models (causal, masked, sequence-to-sequence: labels of ``seq_len`` tokens too; sequence
    classification: one label per sample), pixels and one label per sample for image classifiers.

    Raises:
        ValueError: a model without a Hugging Face config, a task it does not know, or a ``seq_len`` given to an
            image model, each with the fix.
    """
    hf = find_hf_model(module)
    if hf is None:
        raise ValueError(
            f"Expected an example_batch to trace {type(module).__name__}: it is no Hugging Face model, so its inputs"
            " are unknown. Fix: pass example_batch=one micro-batch (what the dataloader yields)."
        )
    config = hf.config
    task = type(hf).__name__
    B, gen = micro_batch_size, torch.Generator().manual_seed(0)
    if hf.main_input_name == "pixel_values":
        if seq_len is not None:
            raise ValueError(
                f"Expected no seq_len for the image model {task}, got seq_len={seq_len}: its tokens come from"
                " config.image_size. Fix: drop seq_len (micro_batch_size counts images)."
            )
        size = _image_size(config)
        pixels = torch.randn(B, getattr(config, "num_channels", 3), size, size, generator=gen)
        return {"pixel_values": pixels, "labels": torch.randint(0, max(1, config.num_labels), (B,), generator=gen)}
    if hf.main_input_name != "input_ids":
        raise ValueError(
            f"Expected a text or image model for a config-only prediction, got {task} (inputs"
            f" {hf.main_input_name!r}). Fix: build the model and pass it with example_batch=one real micro-batch."
        )
    rows = _learned_positions(hf)
    S = seq_len or min([_default_seq_len(config), *rows.values()])
    for name, n in rows.items():
        if n < S:
            raise ValueError(
                f"Expected seq_len <= {n} for {task}, whose learned position embeddings ({name}) have {n} positions,"
                f" got seq_len={S}. Fix: seq_len={n} or less, or a config with more positions"
                " (max_position_embeddings)."
            )
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    ids = torch.randint(0, vocab, (B, S), generator=gen)
    if task.endswith("ForSequenceClassification"):
        return {"input_ids": ids, "labels": torch.randint(0, max(1, config.num_labels), (B,), generator=gen)}
    if task.endswith("ForTokenClassification"):
        return {"input_ids": ids, "labels": torch.randint(0, max(1, config.num_labels), (B, S), generator=gen)}
    return {"input_ids": ids, "labels": torch.randint(0, vocab, (B, S), generator=gen)}


def _learned_positions(hf: nn.Module) -> "dict[str, int]":
    """The positions each learned table of absolute positions has (GPT-2's ``wpe``, BERT's and OPT's position
    embeddings), by module name. A longer sequence has no row for its last positions in the real step (an index
    error on the CPU, a device-side assert on CUDA), while fake tensors would trace it. Rotary, ALiBi and relative
    positions have no such table and take any length."""
    out = {}
    for name, sub in hf.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(sub, nn.Embedding) and ("position" in leaf or leaf == "wpe"):
            offset = getattr(sub, "offset", None)  # BART's and OPT's learned positions start at row 2
            if offset is None:  # RoBERTa's after the padding row
                offset = sub.padding_idx + 1 if sub.padding_idx is not None else 0
            out[name] = sub.num_embeddings - offset
    return out


def _default_seq_len(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _image_size(config: Any) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(
            f"Expected config.image_size for an image model, got {size!r}. Fix: set image_size in the config, or"
            " pass the model with example_batch."
        )
    return size
