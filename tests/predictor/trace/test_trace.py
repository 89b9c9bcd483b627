import contextlib
import copy

import pytest
import torch
from accuracy_targets import scratch_allowance
from predictor._modules import CNN, LMStep, hf_from_config, lora
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_memopt.measuring.cpu_allocator import CPUAllocationCounter
from lightning_memopt.measuring.memory import collect_garbage
from lightning_memopt.measuring.tensor_tracker import TensorMemoryTracker
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.trace.step import trace_step


def _batch(kind: str):
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 10, (2,))}
    ids = torch.randint(0, 300, (2, 24))
    return {"input_ids": ids, "labels": ids}


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "cnn":
        return CNN(), (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    if kind == "plain":
        return LMStep(layers=2), torch.randint(0, 256, (2, 24))
    if kind == "lightning-demo":  # holds its positional encoding and masks as plain tensor attributes
        from lightning.pytorch.demos import Transformer

        class Demo(nn.Module):
            def __init__(self):
                super().__init__()
                self.t = Transformer(vocab_size=100, ninp=32, nhead=2, nhid=64, nlayers=2)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.nll_loss(self.t(x, y), y.view(-1))

        return Demo(), (torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))
    if kind == "lora":
        return lora(hf_from_config("llama")), _batch("llama")
    return hf_from_config(kind), _batch(kind)


def _real_peak(model: nn.Module, batch, mode: str) -> "tuple[int, int]":
    """The peak of one eager step (forward, zero_grad, backward, as Lightning orders them): ``(allocated, live)``.

    ``allocated``: every byte the CPU allocator hands out, counted by the counting allocator (the judge: code the
    predictor does not share; kernel scratch included). ``live``: live tensor storages, counted by the dispatch tracker
    (what the trace models; it explains the gap, it does not judge)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    # Lightning's MixedPrecision: autocast without its weight-cast cache
    amp = mode == "amp"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if amp else contextlib.nullcontext()

    def step():
        with autocast:
            if hasattr(model, "training_step"):
                loss = model.training_step(batch, 0)
            else:
                out = model(**batch) if isinstance(batch, dict) else model(*batch)
                loss = out if isinstance(out, torch.Tensor) else out.loss
                del out  # a training_step returns the loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    step()  # lazily created attributes (a cached mask) exist from the second step on, as in training
    optimizer.zero_grad(set_to_none=True)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_flatten(batch)[0]
                if isinstance(t, torch.Tensor)}  # fmt: skip
    batch_bytes = sum(storages.values())  # the batch is on the device through the step
    collect_garbage()  # an earlier test's counted storages, freed later, would be taken off the shared count mid-step
    counter = CPUAllocationCounter()
    try:
        base = counter.current_bytes
        counter.reset_peak()
        step()
        allocated = counter.peak_bytes - base
    finally:
        counter.close()
    optimizer.zero_grad(set_to_none=True)
    tracker = TensorMemoryTracker("cpu")
    tracker.track(model, batch)
    with tracker:
        base = tracker.current_bytes
        tracker.reset_peak()
        step()
        live = tracker.peak_bytes - base
    return allocated + batch_bytes, live + batch_bytes


#: what an fp32 step without convolutions allocates beyond its live tensors (measured: 0 to 32 bytes)
SMALL_ALLOCATIONS = 64
MODES = {"fp32": ("32-true", "torch"), "bf16": ("bf16-mixed", "deepspeed"), "amp": ("bf16-mixed", "torch")}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "kind", ["llama", "t5", "bert", "vit", "mixtral", "gpt_neox", "deepseek_v3", "cnn", "plain", "lora"]
)
def test_the_trace_is_the_eager_step_to_the_byte(kind, mode):
    """Encoder-decoder, encoder, vision, MoE (transformers' grouped experts, fp32 too), parallel-residual, MLA, a
    CNN with BatchNorm, a plain model with its own loss, a PEFT LoRA model: the fake step's live bytes (with the
    gradients handed over) peak where the eager step's do.

    The judge is the counting allocator: the trace is never above it, and below it by no more than the kernels'
    scratch (none to speak of in fp32 without convolutions: a few bytes; oneDNN's bf16 matmuls and convolutions
    take up to 120 KB here, :func:`accuracy_targets.scratch_allowance`). The dispatch tracker explains the rest: the
    live storages agree to the byte."""
    model, batch = _model(kind)
    if mode == "bf16":  # DeepSpeed runs a 16-bit module
        model = model.bfloat16()
        batch = tree_map(lambda t: t.bfloat16() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, batch)
    precision, engine = MODES[mode]
    res = trace_step(model, batch, resolve_precision(precision), engine=engine)
    predicted = max(live + grads for live, grads in zip(res.live, res.grads))
    allocated, live = _real_peak(model, batch, mode)
    convolutions = kind in ("cnn", "vit")  # ViT's patch embedding is a convolution
    scratch = scratch_allowance("32-true" if mode == "fp32" else "bf16-mixed", convolutions) or SMALL_ALLOCATIONS
    assert 0 <= allocated - predicted <= scratch, (allocated, predicted)
    assert predicted == live  # the explanation: the live storages, to the byte


@pytest.mark.parametrize("kind", ["bart", "llama"])
def test_an_all_ones_padding_mask_takes_sdpas_causal_path_as_in_the_eager_step(kind):
    """transformers skips a 4-D causal mask when the padding mask is all ones (``is_causal=True`` in SDPA), but not
    for a tensor it takes for a traced one (a ``FakeTensor``): BART's decoder makes that padding mask itself, a Llama
    gets it from the batch (a tokenizer's ``attention_mask``). The trace reads the mask's values as the eager step
    does, so it takes the same path: no mask is built or saved for backward (before: 9 KiB over for BART, 33 KiB
    for the Llama at this size)."""
    model = hf_from_config(kind)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 300, (2, 24))
    batch = {"input_ids": ids, "labels": ids}
    if kind == "llama":
        batch["attention_mask"] = torch.ones_like(ids)
    res = trace_step(model, batch, resolve_precision("32-true"), engine="torch")
    predicted = max(live + grads for live, grads in zip(res.live, res.grads))
    allocated, live = _real_peak(model, batch, "fp32")
    assert 0 <= allocated - predicted <= SMALL_ALLOCATIONS, (allocated, predicted)
    assert predicted == live


def test_plain_tensor_attributes_and_value_checks_are_traced():
    """Lightning's demo Transformer keeps its mask and positional encoding as plain attributes, made in forward,
    and ``nn.Transformer`` inspects the mask's values (is it causal?): the values come from the shadows."""
    model, batch = _model("lightning-demo")
    res = trace_step(model, batch, resolve_precision("32-true"), engine="torch")
    assert model.t.pos_encoder.pe is None  # the trace leaves no fake tensor behind
    predicted = max(live + grads for live, grads in zip(res.live, res.grads))
    collect_garbage()
    counter = CPUAllocationCounter()  # the model still trains: its first step (mask and encoding made), measured
    try:
        base = counter.current_bytes
        counter.reset_peak()
        model.training_step(batch, 0).backward()
        allocated = counter.peak_bytes - base + sum(t.untyped_storage().nbytes() for t in batch)
    finally:
        counter.close()
    assert 0 <= allocated - predicted <= SMALL_ALLOCATIONS, (allocated, predicted)


def test_trace_does_not_touch_the_module():
    model = hf_from_config("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    bf16 = resolve_precision("bf16-mixed")
    trace_step(model, _batch("llama"), bf16, activation_checkpointing=True, attention="eager")
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in model.state_dict().items())


def test_attention_set_for_the_trace_reaches_every_config_of_the_model():
    """T5's encoder and decoder stacks hold copies of the model's config: the trace's attention reaches them, so a
    T5 built with SDPA and traced with ``attention="eager"`` steps as one built with eager attention (before: the
    SDPA step, +38 % against a measured bf16 eager run at ZeRO-3, where eager takes less than SDPA on the CPU), and
    every config gets its own setting back."""
    sdpa = hf_from_config("t5")
    eager = type(sdpa)._from_config(copy.deepcopy(sdpa.config), attn_implementation="eager").train()
    batch = {"input_ids": torch.randint(1, 300, (2, 32)), "labels": torch.randint(1, 300, (2, 32))}
    prec = resolve_precision("bf16-mixed")
    switched = trace_step(sdpa, batch, prec, engine="torch", attention="eager")
    built = trace_step(eager, batch, prec, engine="torch")
    as_is = trace_step(sdpa, batch, prec, engine="torch")
    assert switched.live == built.live and switched.peak < as_is.peak
    assert {m.config._attn_implementation for m in sdpa.modules() if hasattr(m, "config")} == {"sdpa"}


@pytest.mark.parametrize("kind", ["plain", "vit"])
def test_forward_of_checkpointed_blocks_under_lightning_autocast(kind):
    """Lightning's bf16-mixed runs the step under ``autocast(cache_enabled=False)``: a checkpointed block's bf16 weight
    casts die with their op. With the cache (autocast's default) the trace kept them until the forward ended: 199,424
    bytes too many here for the plain model, 140,928 for the ViT (the forward matters: the previous step's gradients
    are alive during it, under Lightning; ViT bf16-mixed with checkpointing was over-predicted by 2.3 %)."""
    from lightning_memopt.core.blocks import auto_blocks, checkpoint_block

    model, batch = _model(kind)
    res = trace_step(model, batch, resolve_precision("bf16-mixed"), engine="torch", activation_checkpointing=True)
    for name in auto_blocks(model):
        checkpoint_block(model.get_submodule(name))
    tracker = TensorMemoryTracker("cpu")
    tracker.track(model, batch)
    with tracker:
        base = tracker.current_bytes
        tracker.reset_peak()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = model.training_step(batch, 0) if hasattr(model, "training_step") else model(**batch).loss
        forward_peak = tracker.peak_bytes - base
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_flatten(batch)[0]}
    batch_bytes = sum(storages.values())
    assert max(res.live[: res.forward_end + 1]) == forward_peak + batch_bytes
    loss.backward()


def test_checkpointing_saves_less():
    model, ids = _model("plain")
    prec = resolve_precision("32-true")
    full, ckpt = trace_step(model, ids, prec), trace_step(model, ids, prec, activation_checkpointing=True)
    assert ckpt.saved_bytes < full.saved_bytes and ckpt.peak < full.peak


def test_a_step_without_a_loss_or_with_data_dependent_shapes_is_refused_clearly():
    with pytest.raises(ValueError, match="scalar loss .* got a tensor of shape"):
        trace_step(nn.Linear(4, 2), torch.zeros(3, 4), resolve_precision("32-true"))
    frozen = nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="does not require gradients"):
        trace_step(frozen, torch.zeros(3, 4), resolve_precision("32-true"), step=lambda m, b: m(b).sum())

    class Untraceable(nn.Module):  # reads an activation's data outside torch: a fake tensor has none
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            h = self.proj(x)
            self.seen = h.detach().numpy()
            return h.sum()

    with pytest.raises(Exception, match="numpy|data"):
        trace_step(Untraceable(), torch.zeros(3, 4), resolve_precision("32-true"))


def test_zero3_trace_keeps_a_packed_attention_projection_gathered_while_its_views_are_saved():
    """Under ZeRO-3 every module gets its inputs as new tensors (DeepSpeed's ``_post_backward_module_hook``), so
    ``nn.MultiheadAttention`` projects q, k and v with three views of its packed ``in_proj_weight``, which DeepSpeed's
    Linear saves for backward: the gathered weight (and bias) stays alive into backward."""
    from plain_transformer import PlainLM

    torch.manual_seed(0)
    model = PlainLM(hidden=64, layers=2, attention="sdpa")
    ids = torch.randint(0, 256, (2, 32))
    prec = resolve_precision("32-true")
    plain, zero3 = (trace_step(model, ids, prec, zero3=flag) for flag in (False, True))
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    packed = sum(m.in_proj_weight.numel() + m.in_proj_bias.numel() for m in attentions)
    forward_peak = [max(res.live[: res.forward_end + 1]) for res in (plain, zero3)]
    assert forward_peak[1] - forward_peak[0] == 4 * packed
    assert zero3.live[-1] == plain.live[-1]  # released with the saved views: nothing more left after backward


def test_large_known_values_are_computed_when_read_and_see_no_later_write():
    """A large value made from constants (a causal mask of CPU attention's math path) is computed only when an op
    reads it, and reads what it would have read when made, even after an op writes into what it was made from."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memopt.predictor.trace import tracker as tracker_module

    mode = FakeTensorMode()
    tracker = tracker_module.LiveTensorTracker(set(), None, False, mode)
    assert tracker_module.DEFER_FROM <= 512 * 512
    with mode, tracker:
        ones = torch.ones(512, 512)
        mask = ones.tril()
        ones.fill_(2.0)  # a write: every deferred value is computed first
        total = int(mask.sum().item())  # the mask as it was made
        doubled = int(ones.sum().item())
        unread = torch.ones(512, 512).triu()
        deferred = tracker.shadow.get(unread, compute=False)
    assert total == 512 * 513 // 2 and doubled == 2 * 512 * 512
    assert deferred.deferred.outputs is None  # never read, never computed
