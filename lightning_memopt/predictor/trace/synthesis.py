"""Trace a deep model at full width but reduced depth, then write out the full-depth timeline.

Tracing costs one fake-tensor dispatch per op, so an 80-block model costs 80 blocks. Blocks of one *class* (same
module tree, parameter shapes, per-block settings and per-layer config entries, same checkpointing) do the same
thing to memory, so the trace runs only the first two and the last block of every class. The others stay in the
model but pass their input through (:class:`_PassThrough`); every op outside the blocks still runs, so per-layer
logic indexed by position keeps working.

Every op is labelled with the block running it (forward: module hooks; backward: the autograd node running, by
sequence number) and every storage is recorded with the ops it was allocated and freed at. :func:`synthesize`
then writes each skipped block's storages as a copy of its representative's (the last run block of its class
before it), placed in the skipped block's own slot: a storage freed within its block keeps its offset there, one
freed elsewhere (a KV cache dropped when the step returns) at the same moment as the representative's. The hidden
state passed between blocks is the exception: block ``p``'s output lives until block ``p + 1`` releases its input,
and the gradient block ``p`` hands back lives until block ``p - 1`` releases it, each at the offset its
representative shows. The trace itself is checked to be fully accounted (its storages add up to its live bytes),
and run blocks of one class must agree; otherwise :class:`SynthesisError` tells the caller to trace every block.

Under ZeRO-3 the markers also take their places in the sequence of DeepSpeed's recorded events (a counter shared
with :class:`~.zero3.Zero3Gathering`), and a run block's forward ends after DeepSpeed's hook on its output, so that
the skipped blocks' events can be written out too (:mod:`.expand`).
"""

import bisect
import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_memopt.core import compat
from lightning_memopt.core.blocks import is_checkpointed

_INDEX_NAME = re.compile(r"(^|_)(layer|block|depth)?_?(idx|index|id|num|number)$")


class SynthesisError(RuntimeError):
    """The reduced-depth trace cannot stand for the full depth; trace every block."""


def block_classes(module: nn.Module, names: "list[str]", checkpointed: "list[bool]") -> "list[tuple]":
    """A signature per block: blocks with equal signatures do the same thing to memory.

    It holds the module tree (types), every parameter's and buffer's shape, dtype and ``requires_grad``, every
    setting held on the block's modules (strings, bools, ints other than the block's own index, ``None``), whether
    it is checkpointed (``checkpointed``, one flag per block) and the block's entries of the per-layer lists of its
    Hugging Face config (lists as long as the block's own list).
    """
    from lightning_memopt.core.modules import find_hf_model

    config = getattr(find_hf_model(module), "config", None)
    lists = [v for v in vars(config).values() if isinstance(v, (list, tuple))] if config is not None else []
    parents = [name.rpartition(".")[0] for name in names]
    out = []
    for i, (name, parent, ckpt) in enumerate(zip(names, parents, checkpointed)):
        block = module.get_submodule(name)
        position, length = parents[:i].count(parent), parents.count(parent)
        parts: list = [parent, ckpt, tuple(_entry(v[position]) for v in lists if len(v) == length)]
        for sub_name, sub in block.named_modules():
            parts.append((sub_name, type(sub).__name__, is_checkpointed(sub)))
            parts += [(n, tuple(compat.full_shape(p)), p.dtype, p.requires_grad)
                      for n, p in sub.named_parameters(recurse=False)]  # fmt: skip
            parts += [(n, tuple(b.shape), b.dtype) for n, b in sub.named_buffers(recurse=False)]
            parts += sorted(
                (k, v)
                for k, v in vars(sub).items()
                if not k.startswith("_")
                and (v is None or isinstance(v, (str, bool)) or (isinstance(v, int) and not _INDEX_NAME.search(k)))
            )
        out.append(tuple(parts))
    return out


def _entry(item: Any) -> Any:
    return item if isinstance(item, (str, int, float, bool, type(None))) else repr(item)


def choose_run(classes: "list[tuple]", lists: "list[str] | None" = None) -> "set[int]":
    """The blocks to run: the first and the last of every class, and the second too where the first starts its
    block list (``lists``: each block's list, default one list). A class's first block that follows another block
    receives a block's output as every later one does, so it stands for them; the first block of a list does not
    (its input is no block's output). Run blocks of one class other than a list's first are checked to agree.

    Example:
        >>> sorted(choose_run(["a"] * 80))
        [0, 1, 79]
        >>> sorted(choose_run(["d", "d", "d"] + ["m"] * 58))  # a dense prefix, then MoE blocks (DeepSeek-V3)
        [0, 1, 2, 3, 60]
        >>> sorted(choose_run(["a", "a", "b", "a", "b", "b"]))
        [0, 1, 2, 3, 5]
    """
    lists = lists if lists is not None else [""] * len(classes)
    run: "set[int]" = set()
    for cls in set(classes):
        where = [i for i, c in enumerate(classes) if c == cls]
        starts_list = where[0] == 0 or lists[where[0] - 1] != lists[where[0]]
        run.update((where[:2] if starts_list else where[:1]) + where[-1:])
    return run


class _Mark(torch.autograd.Function):
    """Identity (a view) that tells the replica where a skipped block's forward and backward would run."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, replica: "Replica", index: int) -> torch.Tensor:
        ctx.replica, ctx.index = replica, index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        ctx.replica.mark(ctx.index, "backward")
        return grad.view_as(grad), None, None


class _PassThrough(nn.Module):
    """A skipped block: returns its hidden-state input where the run blocks return their hidden state."""

    def __init__(self, index: int, replica: "Replica") -> None:
        super().__init__()
        self.index = index
        self.replica = replica

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.replica.pass_through(self.index, args, kwargs)


@dataclass
class _Watch:
    """A run block's hidden-state storages as ``(storage key, op index seen at)``: its input, its output, the
    gradient it received for its output and the one it handed back for its input."""

    input: "tuple[int, int] | None" = None
    output: "tuple[int, int] | None" = None
    received: "tuple[int, int] | None" = None
    returned: "tuple[int, int] | None" = None


class Replica:
    """Runs the blocks in ``run`` of the blocks ``names`` of a module, skips the others, and labels every op.

    Args:
        names: qualified names of the blocks, in forward order.
        classes: their signatures (:func:`block_classes`).
        run: indices of the blocks that run.
    """

    def __init__(self, names: "list[str]", classes: "list[tuple]", run: "set[int]") -> None:
        self.names, self.classes, self.run = names, classes, run
        self.lists = [name.rpartition(".")[0] for name in names]
        # (after op, block, where, storages freed so far, place in the ZeRO-3 events' sequence)
        self.markers: "list[tuple[int, int, str, int, int]]" = []
        #: the whole model's modules by qualified name, skipped blocks' included (set while installed)
        self.full_modules: "list[tuple[str, nn.Module]]" = []
        #: a counter shared with ZeRO-3's event recorder (:class:`~.zero3.Zero3Gathering`), when one runs
        self.sequence: Any = None
        self.watch: "dict[int, _Watch]" = {i: _Watch() for i in run}
        self._tracker: Any = None
        self._active = -1
        self._seq: "list[tuple[int, int, int]]" = []  # (first, end, block) sequence numbers of run blocks' nodes
        self._open: "dict[int, int]" = {}
        self._params: "dict[int, int]" = {}  # parameter -> run block (labels AccumulateGrad)
        self._template: Any = None  # (hidden-state shape, the rest of the output) of the last run block
        self._skipped_with_grad: "set[int]" = set()
        self._reps: "dict[int, int]" = {}
        self._leaving: "dict[int, tuple[nn.Module, Any]]" = {}  # run block -> (its module, its forward hook)

    def reset(self) -> None:
        """Forget what a trace recorded (markers, watches, hooks' state), for a new trace of the same blocks."""
        self.__init__(self.names, self.classes, self.run)

    def representative(self, i: int) -> int:
        """The run block a skipped block ``i`` copies: the last run block of its class before it (else the first)."""
        if i not in self._reps:
            same = [j for j in sorted(self.run) if self.classes[j] == self.classes[i]]
            before = [j for j in same if j < i]
            self._reps[i] = before[-1] if before else same[0]
        return self._reps[i]

    def full_depth_names(self, names: "Iterable[str]") -> "tuple[str, ...]":
        """Qualified names of a reduced-depth trace (its run blocks' and the rest of the model's) at full depth: a
        name inside a run block stands for the same name in every skipped block that copies it.

        Example:
            >>> r = Replica(["h.0", "h.1", "h.2"], [("A",), ("A",), ("A",)], {0})
            >>> r.full_depth_names(["h.0.g.weight", "head.weight"])
            ('h.0.g.weight', 'h.1.g.weight', 'h.2.g.weight', 'head.weight')
        """
        out = []
        for name in names:
            out.append(name)
            for j in self.run:
                prefix = self.names[j] + "."
                if name.startswith(prefix):
                    rest = name[len(prefix) :]
                    copies = (i for i in range(len(self.names)) if i not in self.run and self.representative(i) == j)
                    out += [f"{self.names[i]}.{rest}" for i in copies]
        return tuple(dict.fromkeys(out))

    def neighbour(self, i: int, step: int) -> "int | None":
        """The block ``step`` places after ``i`` in the same block list (``None`` past its ends)."""
        j = i + step
        return j if 0 <= j < len(self.names) and self.lists[j] == self.lists[i] else None

    @contextlib.contextmanager
    def installed(self, module: nn.Module, tracker: Any) -> Iterator[None]:
        """Skip the blocks not in ``run`` and label the ops of the step traced by ``tracker``."""
        self._tracker = tracker
        tracker.label = self._label
        self.full_modules = list(module.named_modules())
        swapped, handles = [], []
        for i, name in enumerate(self.names):
            owner, _, key = name.rpartition(".")
            parent = module.get_submodule(owner) if owner else module
            if i in self.run:
                block = parent._modules[key]
                handles.append(block.register_forward_pre_hook(self._enter(i), with_kwargs=True))
                self._leaving[i] = (block, block.register_forward_hook(self._leave(i)))
            else:
                swapped.append((parent, key, parent._modules[key]))
                parent._modules[key] = _PassThrough(i, self)
        try:
            yield
        finally:
            for parent, key, block in swapped:
                parent._modules[key] = block
            for h in handles:
                h.remove()
            for _, h in self._leaving.values():
                h.remove()
            self._leaving.clear()
            tracker.label = None

    def leave_last(self) -> None:
        """Move the run blocks' forward hooks behind those registered since: a block's forward then ends after
        them, and the ops they run (DeepSpeed's hook on a block's output, one op per tensor) are the block's, which
        a skipped block's copy then holds too."""
        for i, (block, handle) in list(self._leaving.items()):
            handle.remove()
            self._leaving[i] = (block, block.register_forward_hook(self._leave(i)))

    def _now(self) -> int:
        return len(self._tracker.live) - 1

    def _next_seq(self) -> int:
        with torch.enable_grad(), self._tracker.paused():
            leaf = torch.zeros((), requires_grad=True)
            return leaf.view(()).grad_fn._sequence_nr()

    def _watch_grad(self, tensor: Any, i: int, field: str) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:

            def hook(grad: torch.Tensor) -> None:
                setattr(self.watch[i], field, (grad.untyped_storage()._cdata, self._now() + 1))

            tensor.register_hook(hook)

    def _enter(self, i: int) -> Any:
        def hook(block: nn.Module, args: Any, kwargs: Any) -> None:
            if compat.in_backward():  # a checkpointed block's recomputation: labelled by its autograd node
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self.watch[i].input = (hidden.untyped_storage()._cdata, self._now() + 1)
                self._watch_grad(hidden, i, "returned")
            self._active = i
            self._open[i] = self._next_seq()
            for p in block.parameters():
                self._params[id(p)] = i

        return hook

    def _leave(self, i: int) -> Any:
        def hook(block: nn.Module, args: Any, output: Any) -> None:
            if compat.in_backward():
                return
            self._active = -1
            bisect.insort(self._seq, (self._open.pop(i), self._next_seq(), i))
            first = tree_flatten(output)[0][:1]
            if not first or not isinstance(first[0], torch.Tensor) or not isinstance(output, (torch.Tensor, tuple)):
                raise SynthesisError(f"block {self.names[i]} returns {type(output).__name__}: no hidden state first")
            self.watch[i].output = (first[0].untyped_storage()._cdata, self._now())
            self._watch_grad(first[0], i, "received")
            self._template = (first[0].shape, output[1:] if isinstance(output, tuple) else None)

        return hook

    def mark(self, i: int, where: str) -> None:
        """A skipped block ``i`` passes here (after the last op recorded, after the storages freed so far)."""
        seq = next(self.sequence) if self.sequence is not None else -1
        self.markers.append((self._now(), i, where, len(self._tracker.storages), seq))
        if where == "backward":
            self._skipped_with_grad.discard(i)

    def pass_through(self, i: int, args: Any, kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self._template is None or not isinstance(hidden, torch.Tensor) or hidden.shape != self._template[0]:
            raise SynthesisError(f"skipped block {self.names[i]} cannot mimic the run blocks' output")
        self.mark(i, "forward")
        if hidden.requires_grad and torch.is_grad_enabled():
            self._skipped_with_grad.add(i)
        out = _Mark.apply(hidden, self, i)
        rest = self._template[1]
        return out if rest is None else (out, *rest)

    def _label(self) -> int:
        if not compat.in_backward():
            return self._active
        node = compat.current_autograd_node()
        if node is None:
            return -1
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: the block that owns the parameter
            return self._params.get(id(variable), -1)
        seq = node._sequence_nr()
        k = bisect.bisect_right(self._seq, (seq, float("inf"), 0)) - 1
        if k >= 0 and self._seq[k][0] <= seq < self._seq[k][1]:
            return self._seq[k][2]
        return -1

    def check_complete(self) -> None:
        """Every skipped block that had a backward was marked in it."""
        if self._skipped_with_grad:
            raise SynthesisError(f"no backward seen for skipped blocks {sorted(self._skipped_with_grad)}")
