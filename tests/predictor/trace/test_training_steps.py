"""Training steps that read values, make shapes from them or run their own backward are traced, and predicted as
the real step measures (the counting CPU allocator), with the data-dependent ops stated once with the user's line.

Each module has a Lightning-like ``training_step(batch, batch_idx)`` (the predictor's default step calls it) written
in plain PyTorch; the Lightning calls (``self.log``, collectives, ``manual_backward``) are in
``tests/lightning/callbacks/test_monitor_training_steps.py``. The real step runs as Lightning's automatic
optimization does (forward, ``zero_grad``, backward, optimizer step) or, for a manual step, as its code says; the
second step is measured (the optimizer states exist, the previous gradients are alive in the forward).
"""


import pytest
import torch
from torch import nn

from lightning_memopt.measuring.memory import DeviceMemoryProbe, collect_garbage
from lightning_memopt.planning import estimate_memory
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.trace.step import trace_step

TARGET = 0.03
HIDDEN, BATCH, SEQ, VOCAB = 128, 8, 64, 256


def _batch(seed: int = 0) -> dict:
    """Token ids with right padding: sample ``i`` has ``SEQ - 4 * i`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < (SEQ - 4 * torch.arange(BATCH))[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


class Tiny(nn.Module):
    """Embedding, two MLP blocks, an output head: a language model small enough to step on CPU in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(),
                                                    nn.Linear(4 * HIDDEN, HIDDEN)) for _ in range(2)))  # fmt: skip
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.losses: list = []

    def hidden(self, batch: dict) -> torch.Tensor:
        return self.blocks(self.embed(batch["input_ids"]))

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self.head(self.hidden(batch))
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)


class LogsValues(Tiny):
    """``.item()`` and ``.tolist()`` for logging, and a skipped step on a NaN loss."""

    def training_step(self, batch: dict, batch_idx: int) -> "torch.Tensor | None":
        loss = self.loss(batch)
        if torch.isnan(loss) or not torch.isfinite(loss).all():
            return None
        self.losses.append(loss.detach().float().item())
        self.losses.append(batch["attention_mask"].sum(1).tolist())
        return loss


class MasksPadding(Tiny):
    """The loss over real tokens only: ``hidden[attention_mask.bool()]`` (the size comes from the batch)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keep = batch["attention_mask"].bool()
        hidden = self.hidden(batch)[keep]
        return nn.functional.cross_entropy(self.head(hidden), batch["input_ids"][keep])


class MoE(Tiny):
    """Eager top-2 routing over 4 experts with ``topk``, ``one_hot``, ``nonzero`` and ``where`` (as Mixtral's eager
    experts): the rows each expert gets depend on the router's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(HIDDEN, 4)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(),
                                                   nn.Linear(2 * HIDDEN, HIDDEN)) for _ in range(4))  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = self.hidden(batch).flatten(0, 1)
        weights, chosen = torch.topk(self.router(hidden).softmax(-1), 2, dim=-1)
        mask = nn.functional.one_hot(chosen, 4).permute(2, 1, 0)  # expert, slot, token
        out = torch.zeros_like(hidden)
        for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            slot, token = torch.where(mask[expert].squeeze(0))
            rows = self.experts[expert](hidden[token]) * weights[token, slot, None]
            out = out.index_add(0, token, rows)
        logits = self.head(out)
        return nn.functional.cross_entropy(logits, batch["input_ids"].flatten())


class Metric(Tiny):
    """A torchmetrics accuracy updated in the step (its states are tensors of the metric)."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.accuracy = MulticlassAccuracy(num_classes=VOCAB)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.hidden(batch))
        self.accuracy(logits.argmax(-1), batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())


class Manual(Tiny):
    """Manual optimization: ``zero_grad``, backward, ``clip_grad_norm_`` and the optimizer step in the step."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizer
        opt.zero_grad()
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        opt.step()
        return loss.detach()


class TwoOptimizers(Tiny):
    """A GAN-style step: a generator (embedding and blocks) and a critic (the head) with their own optimizers and
    losses, two backward passes per step."""

    def configure_optimizer(self) -> list:
        return [torch.optim.AdamW([*self.embed.parameters(), *self.blocks.parameters()], lr=1e-3),
                torch.optim.AdamW(self.head.parameters(), lr=1e-3)]  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        gen, critic = self.optimizer
        gen.zero_grad()
        fake = self.hidden(batch)
        gen_loss = -self.head(fake).logsumexp(-1).mean()
        gen_loss.backward()
        gen.step()
        critic.zero_grad()
        critic_loss = self.head(fake.detach()).logsumexp(-1).mean()
        critic_loss.backward()
        critic.step()
        return critic_loss.detach()


class Compiled(Tiny):
    """A ``torch.compile``d block (backend ``aot_eager``: dynamo and AOTAutograd without a C++ compiler)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[1] = torch.compile(self.blocks[1], backend="aot_eager")


MANUAL = (Manual, TwoOptimizers)


def _real_step(model: Tiny, batch: dict) -> None:
    if isinstance(model, MANUAL):
        model.training_step(batch, 0)
        return
    loss = model.training_step(batch, 0)  # as Lightning's automatic optimization: forward, zero_grad, backward, step
    opts = model.optimizer if isinstance(model.optimizer, list) else [model.optimizer]
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    for opt in opts:
        opt.step()


def _measured_peak(model: Tiny, batch: dict) -> int:
    """Peak CPU bytes (counting allocator) of the second real step, model, gradients and optimizer states included."""
    _real_step(model, batch)  # the optimizer states are created in the first step
    collect_garbage()
    probe = DeviceMemoryProbe("cpu", cpu_mode="allocator")
    try:
        # the counter is process-wide: storages an earlier test counted and still holds are not this step's
        leftover = probe.current_bytes
        probe.track(model, batch, *(model.optimizer if isinstance(model.optimizer, list) else [model.optimizer]))
        probe.start_step()
        _real_step(model, batch)
        return probe.end_step().peak_bytes - leftover
    finally:
        probe.close()


@pytest.mark.parametrize("cls", [LogsValues, MasksPadding, MoE, Metric, Manual, TwoOptimizers, Compiled],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_a_step_is_predicted_as_the_real_step_measures(cls):
    batch = _batch()
    model = cls()
    model.optimizer = model.configure_optimizer()
    estimate = estimate_memory(model, example_batch=batch, engine="torch", precision="32-true", optimizer="adamw")
    measured = _measured_peak(model, batch)
    error = (estimate.total - measured) / measured
    print(f"{cls.__name__}: predicted {estimate.total}, measured {measured}: {error:+.2%}")
    assert abs(error) <= TARGET, f"predicted {estimate.total}, measured {measured}: {error:+.2%}"


def _lines_of(cls: type, text: str) -> int:
    import inspect

    lines, first = inspect.getsourcelines(cls)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_the_data_dependent_ops_are_stated_once_with_the_users_line_and_how_they_were_answered():
    model = LogsValues()
    before = list(model.losses)
    est = estimate_memory(model, example_batch=_batch(), engine="torch", precision="32-true")
    depends = est.details["depends_on_batch"]
    here = __file__
    item, tolist = _lines_of(LogsValues, "float().item()"), _lines_of(LogsValues, "sum(1).tolist()")
    nan = _lines_of(LogsValues, "if torch.isnan")
    assert f"aten._local_scalar_dense at {here}:{item}: a stand-in 0.0 for a value of the weights" in depends[-2]
    assert depends[-1] == f"aten._local_scalar_dense at {here}:{tolist}: from the batch's values"  # once per line
    assert f"at {here}:{nan}: values assumed finite (isnan at {here}:{nan})" in depends[0]
    assert model.losses == before  # the step's Python side effects are undone

    routed = estimate_memory(MoE(), example_batch=_batch(), engine="torch", precision="32-true")
    nonzero = [d for d in routed.details["depends_on_batch"] if d.startswith("aten.nonzero")]
    assert nonzero and "balanced routing assumed (topk at" in nonzero[0]
    padded = estimate_memory(MasksPadding(), example_batch=_batch(), engine="torch", precision="32-true")
    assert padded.details["depends_on_batch"] == [
        f"aten.index at {here}:{_lines_of(MasksPadding, 'self.hidden(batch)[keep]')}: from the batch's values",
        f"aten.index at {here}:{_lines_of(MasksPadding, 'cross_entropy(self.head(hidden)')}: from the batch's values",
    ]
    plain = estimate_memory(Tiny(), example_batch=_batch(), engine="torch", precision="32-true", optimizer="sgd")
    assert "depends_on_batch" not in plain.details


def test_a_padding_mask_selects_the_rows_the_batch_says_and_balanced_routing_splits_tokens_evenly():
    prec = resolve_precision("32-true")
    batch = _batch()
    tokens = int(batch["attention_mask"].sum())
    selected = []

    class Seen(MasksPadding):
        def training_step(self, batch, batch_idx):
            hidden = self.hidden(batch)[batch["attention_mask"].bool()]
            selected.append(hidden.shape[0])
            return hidden.sum()

    trace_step(Seen(), batch, prec)
    assert selected == [tokens] and tokens < BATCH * SEQ  # the real count, not the padded size

    counts = []

    class Counted(MoE):
        def training_step(self, batch, batch_idx):
            hidden = self.hidden(batch).flatten(0, 1)
            chosen = torch.topk(self.router(hidden), 2, dim=-1).indices
            counts.extend(int((chosen == e).sum()) for e in range(4))
            return hidden.sum()

    trace_step(Counted(), batch, prec)
    assert counts == [BATCH * SEQ * 2 // 4] * 4


def test_a_step_that_cannot_be_traced_says_which_op_and_which_line_of_the_users_code():
    class Untraceable(Tiny):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.losses.append(loss.detach().numpy())  # a fake tensor has no data
            return loss

    line = _lines_of(Untraceable, "detach().numpy()")
    with pytest.raises(Exception) as info:
        trace_step(Untraceable(), _batch(), resolve_precision("32-true"))
    assert f"at {__file__}:{line})" in "".join(getattr(info.value, "__notes__", []))


def test_the_trace_leaves_the_real_optimizer_and_gradients_alone():
    model = Manual()
    model.optimizer = model.configure_optimizer()
    _real_step(model, _batch())  # real gradients and optimizer states
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    zero_grad, step = torch.optim.Optimizer.zero_grad, torch.optim.AdamW.step
    res = trace_step(model, _batch(), resolve_precision("32-true"))
    assert res.released_before_forward == 1.0 and res.grad_bytes == 4 * sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]) and torch.equal(p.detach(), weights[name])
    assert torch.optim.Optimizer.zero_grad is zero_grad and torch.optim.AdamW.step is step  # put back
