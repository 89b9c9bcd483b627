"""The context a traced step runs in: what :func:`~lightning_memopt.predictor.trace.trace_step` puts in place around
the step and takes away after it (fake tensors in place of plain tensor attributes, DeepSpeed ZeRO-3's fresh module
inputs, the attention implementation asked for), and readable errors for a step that cannot be traced."""

import contextlib

import torch
from torch import nn

from lightning_memopt.predictor.reading import find_hf_model


@contextlib.contextmanager
def readable_errors(module: nn.Module):
    """Turn fake-tensor errors about data-dependent shapes into an error that says what to do."""
    from torch._subclasses import fake_tensor as ft

    try:
        yield
    except (ft.DataDependentOutputException, ft.DynamicOutputShapeException) as err:
        op = getattr(err, "func", None) or str(err).split("\n")[0]
        raise ValueError(
            f"Expected a training step of {type(module).__name__} whose tensor shapes do not depend on the data, to"
            f" trace it without allocating, got the data-dependent op {op}. Fix: switch the model to a path with"
            " fixed shapes (Hugging Face MoE: model.set_experts_implementation('grouped_mm')), or pass a"
            " parameter count for the model states only."
        ) from err


@contextlib.contextmanager
def swapped_attributes(module: nn.Module, fakes: "list[tuple[str, torch.Tensor]]"):
    """Hold the fake tensors in place of the module's plain tensor attributes; on exit restore them and drop the
    fake tensors the step itself stored on the modules (a mask cached in ``forward``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    originals = []
    for name, fake in fakes:
        owner, _, key = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        originals.append((sub, key, sub.__dict__[key]))
        sub.__dict__[key] = fake
    before = {id(sub): dict(vars(sub)) for sub in module.modules()}
    try:
        yield
    finally:
        for sub, key, value in originals:
            sub.__dict__[key] = value
        for sub in module.modules():
            held = before.get(id(sub), {})
            for key, value in list(vars(sub).items()):
                if isinstance(value, FakeTensor):
                    if key in held and not isinstance(held[key], FakeTensor):
                        sub.__dict__[key] = held[key]
                    else:
                        del sub.__dict__[key]


@contextlib.contextmanager
def zero3_module_inputs(module: nn.Module, zero3: bool):
    """As DeepSpeed ZeRO-3's ``_post_backward_module_hook`` does, hand every sub-module its tensor arguments as new
    tensors (a view each): the same tensor passed twice arrives as two objects (``nn.MultiheadAttention`` then
    projects q, k and v separately)."""
    if not zero3:
        yield
        return

    def fresh(_: nn.Module, args: tuple) -> tuple:
        return tuple(a.view_as(a) if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(fresh, prepend=True) for m in module.modules() if m is not module]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def attention(module: nn.Module, attention: "str | None"):
    """Set a Hugging Face model's attention implementation for the trace (plain modules keep theirs): on every
    config its modules hold (T5's encoder and decoder stacks hold copies of the model's config)."""
    hf_model = find_hf_model(module)
    configs = {} if attention is None or hf_model is None else {
        id(c): c for m in hf_model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")
    }  # fmt: skip
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = attention
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]
