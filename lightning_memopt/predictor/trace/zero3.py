"""Which ZeRO-3 parameters are gathered at every op of a traced step: DeepSpeed 0.19.8's own rules, replayed.

DeepSpeed registers hooks on every module (``zero/parameter_offload.py`` ``_register_deepspeed_module``):

* a module's parameters are fetched (all-gathered) before its forward, and before its backward when the gradient of
  one of its outputs arrives (``PreBackwardFunctionForModule`` on every output tensor);
* they are released after its forward, and after its backward once the gradients of all its positional tensor
  inputs that require them are computed (``PostBackwardFunctionModule``: a module whose inputs need no gradient,
  or that receives its tensors as keyword arguments, never fires it); what is still held then is released at the
  end of backward (``release_backward_leftovers``);
* ``partitioned_param_coordinator.py`` decides: once the module trace of a step is complete (recorded the step
  before), a release keeps every parameter used again by a later module of the trace within
  ``stage3_max_reuse_distance`` elements, and every parameter the prefetcher already took for a later use
  (``__params_to_release``); after each fetch it prefetches the next parameters of the trace, up to
  ``stage3_prefetch_bucket_size`` elements; frozen parameters fetched while a checkpointed block is recomputed are
  released with the backward of the module whose backward is running (``update_recompute_parameters``). Without a
  complete trace (the step calls the model itself, which restarts it) every release frees all the module's
  parameters and nothing is prefetched.

So a frozen module whose output needs no gradient (frozen embeddings and the blocks before the first trainable
one) is released after its forward, and a module's parameters are released after its backward: the bytes gathered
vary along the step. :class:`Zero3Gathering` records these events during the trace (hooks like DeepSpeed's, at
the same points) and replays the coordinator on them afterwards, when the whole module trace is known. Parameters
at or below ``stage3_param_persistence_threshold`` elements stay whole on every rank: they are model states
(:mod:`lightning_memopt.predictor.account.model_states`), not gathered here. NVMe prefetching is not modelled.

ZeRO-3 leaf modules (:func:`leaf_modules`: those of the config's ``zero_optimization.leaf_module``, by default
DeepSpeed 0.19.8's Mixtral, Qwen2-MoE and Qwen3-MoE sparse MoE blocks;
:class:`~lightning_memopt.core.deepspeed_config.LeafModules`) are hooked as one module: the leaf fetches and releases
its whole subtree's parameters and the modules inside it get no hook (``_register_deepspeed_module`` stops there),
and its parameters' gradients wait for the end of its backward (:class:`LeafGradients`).

A reduced-depth trace (:mod:`.synthesis`) records the events of the blocks it runs, on the whole model's modules
(:class:`Zero3Events`); :mod:`.expand` writes out the skipped blocks' events and :func:`replay` runs the coordinator
on the full-depth sequence.
"""

import collections
import itertools
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from typing_extensions import Self

from lightning_memopt.core.compat import full_shape
from lightning_memopt.core.deepspeed_config import DEFAULT_LEAF_MODULES, LeafModules


@dataclass(frozen=True)
class Zero3Settings:
    """The coordinator's settings (``zero_optimization`` keys; DeepSpeed's defaults in
    :mod:`lightning_memopt.core.deepspeed_config`).

    Attributes:
        persistence_threshold: ``stage3_param_persistence_threshold`` (elements).
        max_reuse_distance: ``stage3_max_reuse_distance`` (elements).
        prefetch_bucket_size: ``stage3_prefetch_bucket_size`` (elements).
        max_live_parameters: ``stage3_max_live_parameters`` (elements).
        complete_trace: whether the module trace completes (``False`` when the step calls the model itself).
        partitioned: whether the parameters are split over more than one rank. On one rank DeepSpeed gathers
            nothing: a parameter's data is its partition (``runtime/zero/partition_parameters.py``
            ``all_gather_coalesced`` and ``_allgather_params_coalesced`` take ``_no_gather_coalesced`` when every
            partition world size is 1), so :func:`replay` finds no gathered bytes.
        leaves: which modules the config makes leaf modules (``zero_optimization.leaf_module``).
    """

    persistence_threshold: int
    max_reuse_distance: int
    prefetch_bucket_size: int
    max_live_parameters: int
    complete_trace: bool = True
    partitioned: bool = True
    leaves: LeafModules = DEFAULT_LEAF_MODULES


@dataclass(frozen=True)
class _Param:
    numel: int
    nbytes: int
    trainable: bool
    persistent: bool


@dataclass
class Zero3Events:
    """DeepSpeed's fetch and release events of one step, and what they act on: what :func:`replay` needs.

    A reduced-depth trace records them for the blocks it runs; :mod:`.expand` writes out the full-depth sequence
    (each skipped block's events copied from its representative's, on its own modules and parameters), which the
    coordinator then replays as it would the full trace's.

    Attributes:
        settings: the coordinator's settings.
        params: every parameter's size, by key.
        owned: per module (index in :attr:`modules`): the keys of the parameters it fetches, in DeepSpeed's ds_id
            order: its own; a ZeRO-3 leaf module's whole subtree's; none for a module inside a leaf.
        modules: the modules' qualified names, by index.
        param_names: parameter key -> qualified name.
        events: ``(op, "fetch" | "release", module, forward, during backward)``, in the order they happened.
        pins: ``(parameter key, pinned at, unpinned at or None: alive at the end)``.
        event_seq: per event, its place in the order of everything recorded (events, pins and a reduced-depth
            trace's markers share one counter): what happened first among moments between the same two ops.
        pin_seq: per pin, ``(place pinned, place unpinned or None)`` in that order.
    """

    settings: Zero3Settings
    params: "dict[int, _Param]"
    owned: "list[list[int]]"
    modules: "list[str]"
    param_names: "dict[int, str]"
    events: "list[tuple[int, str, int, bool, bool]]" = field(default_factory=list)
    pins: "list[tuple[int, int, int | None]]" = field(default_factory=list)
    event_seq: "list[int]" = field(default_factory=list)
    pin_seq: "list[tuple[int, int | None]]" = field(default_factory=list)


def replay(rec: Zero3Events, end: int) -> "list[tuple[int, int, int, int]]":
    """``(gathered at, released at, bytes, parameter key)`` of every parameter DeepSpeed gathers along the events
    ``rec``, ops ``[at, released)``; those still gathered when backward ends (``end``) are released there. None on a
    single rank (:attr:`Zero3Settings.partitioned` False): the data of a gathered parameter is its partition."""
    return _Replay(rec, end).run() if rec.settings.partitioned else []


def gathered_bytes(intervals: "list[tuple[int, int, int, int]]", length: int) -> "list[int]":
    """The bytes gathered after each of ``length`` ops, from :func:`replay`'s intervals.

    Example:
        >>> gathered_bytes([(1, 3, 10, 0), (2, 5, 4, 1)], 5)
        [0, 10, 14, 4, 4]
    """
    diff = [0] * (length + 1)
    for born, freed, nbytes, _ in intervals:
        if freed > born:
            diff[born] += nbytes
            diff[min(freed, length)] -= nbytes
    return list(itertools.accumulate(diff[:length]))


class Zero3Gathering:
    """Record DeepSpeed's fetch and release events while a step is traced; :meth:`intervals` replays them.

    Args:
        module: the traced module (hooks go on it and every sub-module).
        settings: the coordinator's settings.
        itemsize: bytes per element of floating parameters (the engine's dtype).
        clock: the number of ops traced so far (events happen between ops).
        named_modules: the modules to index, by qualified name (default: ``module``'s own); a reduced-depth trace
            passes the whole model's, skipped blocks included, so that its events can be written out at full depth.
        sequence: a shared counter placing every event and pin among other recorded moments (default: its own).
    """

    def __init__(
        self,
        module: nn.Module,
        settings: Zero3Settings,
        itemsize: int,
        clock: Any,
        named_modules: "list[tuple[str, nn.Module]] | None" = None,
        sequence: "Any | None" = None,
    ) -> None:
        self.settings, self.clock = settings, clock
        named = list(module.named_modules()) if named_modules is None else named_modules
        self.modules = [m for _, m in named]
        self._sequence = sequence if sequence is not None else itertools.count()
        index = {id(m): i for i, m in enumerate(self.modules)}
        params: dict[int, _Param] = {}
        kept: dict[int, torch.Tensor] = {}
        self.owned: list[list[int]] = []  # per module: its own parameters' keys, in DeepSpeed's ds_id order
        order: dict[int, int] = {}  # module.parameters()' order over the modules indexed
        for m in self.modules:
            for p in m._parameters.values():
                if p is not None:
                    order.setdefault(id(p), len(order))
        self.names: dict[int, str] = {}  # parameter key -> qualified name
        leaves = [prefix for prefix, _ in leaf_modules(named, settings.leaves)]
        self._hooked: list[nn.Module] = []  # DeepSpeed hooks no module inside a leaf module
        for name, m in named:
            keys = []
            for pname, p in m._parameters.items():
                if p is None:
                    continue
                size = itemsize if p.is_floating_point() else p.element_size()
                numel = math.prod(full_shape(p))  # a skipped block's parameter may be partitioned (a live engine)
                persistent = numel <= settings.persistence_threshold
                params.setdefault(id(p), _Param(numel, numel * size, p.requires_grad, persistent))
                kept[id(p)] = p
                self.names.setdefault(id(p), f"{name}.{pname}" if name else pname)
                keys.append(id(p))
            if any(name.startswith(f"{prefix}.") for prefix in leaves):
                keys = []  # its leaf module fetches and releases its parameters
            else:
                self._hooked.append(m)
                if name in leaves:  # a leaf module fetches its whole subtree's parameters
                    keys = [id(p) for p in m.parameters()]
            self.owned.append(sorted(set(keys), key=order.__getitem__))
        self.params = params
        self._index = index
        self._storages = {p.untyped_storage()._cdata: k for k, p in kept.items()}
        self.module_names = [name for name, _ in named]
        # [parameter key, pinned at, unpinned at (None: alive at the end), sequence pinned, sequence unpinned]
        self.pins: list[list[Any]] = []
        # (op, "fetch" | "release", module, forward, during backward)
        self.events: list[tuple[int, str, int, bool, bool]] = []
        self.event_seq: list[int] = []
        self._remaining = collections.Counter()
        self._handles: list = []

    def __enter__(self) -> Self:
        for m in self._hooked:
            self._handles.append(m.register_forward_pre_hook(self._pre_forward))
            self._handles.append(m.register_forward_hook(self._post_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pin(self, storage: int, view: torch.Tensor) -> bool:
        """A view of a parameter saved for backward (``LinearFunctionForZeroStage3`` saves the slices of
        ``nn.MultiheadAttention``'s packed projection): the gathered storage lives until the view dies, even once
        DeepSpeed released the parameter. ``False`` when ``storage`` is no parameter's."""
        key = self._storages.get(storage)
        if key is None:
            return False
        entry = [key, self.clock(), None, next(self._sequence), None]
        self.pins.append(entry)

        def unpinned() -> None:
            entry[2], entry[4] = self.clock(), next(self._sequence)

        weakref.finalize(view, unpinned)
        return True

    def state_alias(self, storage: int, view: torch.Tensor) -> None:
        """An op's output that aliases a parameter: during backward, a recomputed checkpointed op saving its weight
        (``torch.utils.checkpoint``'s recomputation saves ``x.detach()`` of a tensor that requires grad). DeepSpeed
        releases the parameter after the recomputed forward, but that alias keeps the gathered storage until the
        op's backward has used it, while the module's backward gathers the parameter anew (two copies, measured)."""
        if torch._C._current_graph_task_id() != -1:
            self.pin(storage, view)

    # ------------------------------------------------------------------ recording (DeepSpeed's hook points)
    def _event(self, kind: str, m: int, forward: bool) -> None:
        in_backward = torch._C._current_graph_task_id() != -1  # as DeepSpeed tells a recomputation
        self.events.append((self.clock(), kind, m, forward, in_backward))
        self.event_seq.append(next(self._sequence))

    def _pre_forward(self, module: nn.Module, args: tuple) -> tuple:
        m = self._index[id(module)]
        self._event("fetch", m, True)
        self._remaining[m] = 0  # _post_backward_module_hook: ds_grads_remaining = 0, one per input needing grad

        def wrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or not t.requires_grad:
                return t
            self._remaining[m] += 1
            return _Hook.apply(t, lambda: self._input_grad(m))

        return tree_map(wrap, args)

    def _input_grad(self, m: int) -> None:
        self._remaining[m] -= 1
        if self._remaining[m] == 0:
            self._event("release", m, False)

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        m = self._index[id(module)]
        self._event("release", m, True)

        def wrap(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or not t.requires_grad:
                return t
            return _Hook.apply(t, lambda: self._event("fetch", m, False))

        return tree_map(wrap, output)

    # ------------------------------------------------------------------ replaying the coordinator
    def recorded(self) -> Zero3Events:
        """What was recorded so far (pins still alive have no unpinning yet)."""
        return Zero3Events(
            self.settings, self.params, self.owned, self.module_names, self.names, list(self.events),
            [(k, at, end) for k, at, end, _, _ in self.pins], list(self.event_seq),
            [(a, b) for _, _, _, a, b in self.pins],
        )  # fmt: skip

    def intervals(self, end: int) -> "list[tuple[int, int, int, int]]":
        """``(gathered at, released at, bytes, parameter key)`` of every gathered parameter, ops ``[at, released)``;
        those still gathered when backward ends (``end``) are released there."""
        return replay(self.recorded(), end)


class _Replay:
    """``PartitionedParameterCoordinator`` of DeepSpeed 0.19.8 over the recorded events."""

    def __init__(self, rec: Zero3Events, end: int) -> None:
        self.rec, self.end, self.s = rec, end, rec.settings
        self.params = rec.params
        # the module trace (DeepSpeed records it the step before; the steady state repeats it)
        self.trace = [m for _, kind, m, _, _ in rec.events if kind == "fetch"]
        self.queue = collections.deque((k, step) for step, m in enumerate(self.trace) for k in rec.owned[m])
        self.recent: dict[int, int] = collections.defaultdict(lambda: -(10**18))
        self.users: dict[int, set[int]] = collections.defaultdict(set)  # param -> ds_active_sub_modules
        self.since: dict[int, int] = {}  # gathered parameter -> gathered at op
        self.available = 0
        self.step = 0
        self.backward: dict[int, None] = {}  # __active_backward_submodules, in insertion order
        self.recompute: dict[int, set[int]] = collections.defaultdict(set)  # ds_recompute_parameters
        self.out: list[tuple[int, int, int, int]] = []
        self.pins: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # key -> (pinned, unpinned)
        for key, at, unpinned in rec.pins:
            self.pins[key].append((at, end if unpinned is None else unpinned))

    def run(self) -> "list[tuple[int, int, int, int]]":
        for op, kind, m, forward, in_backward in self.rec.events:
            if kind == "fetch":
                self._fetch(op, m, forward, recomputing=forward and in_backward)
            else:
                self._release(op, m, forward)
        while self.backward:  # release_backward_leftovers
            m = next(reversed(self.backward))
            del self.backward[m]
            keys = set(self.rec.owned[m]) | self.recompute.pop(m, set())
            for k in keys:
                self.users[k].discard(m)
            self._free(self.end, [k for k in keys if not self.params[k].persistent])
        self.users.clear()
        self._free(self.end, list(self.since))  # nothing stays gathered into the optimizer step
        return self.out

    def _gather(self, keys: "list[int]", op: int) -> None:
        for k in keys:
            if k not in self.since and not self.params[k].persistent:
                self.since[k] = op
                self.available += self.params[k].numel

    def _free(self, op: int, keys: "list[int]") -> None:
        """``__release_param``: only a gathered parameter no active module still uses; its storage lives on while a
        view of it saved for backward does."""
        for k in keys:
            if k in self.since and not self.users[k]:
                self.available -= self.params[k].numel
                since = self.since.pop(k)
                ends = [e for at, e in self.pins.get(k, ()) if since <= at < op]
                self.out.append((since, max([op, *ends]), self.params[k].nbytes, k))

    def _fetch(self, op: int, m: int, forward: bool, recomputing: bool) -> None:
        if not forward:
            self.backward.setdefault(m, None)
        keys = self.rec.owned[m]
        self._gather(keys, op)
        for k in keys:
            self.users[k].add(m)
            if recomputing and self.backward and not self.params[k].trainable:
                owner = next(reversed(self.backward))  # the module whose backward runs
                self.recompute[owner].add(k)
                self.users[k].add(owner)
        if self.s.complete_trace:
            wanted = {k for k in keys if self.recent[k] < self.step}
            popped: set[int] = set()
            while self.queue and len(popped) < len(wanted):
                k, last = self.queue.popleft()
                self.recent[k] = last
                popped.add(k)
            budget = min(self.s.max_live_parameters - self.available, self.s.prefetch_bucket_size)
            prefetch: list[int] = []
            numel = 0
            while self.queue and numel < budget:
                k, last = self.queue.popleft()
                if k not in self.since and k not in prefetch and not self.params[k].persistent:
                    prefetch.append(k)
                    numel += self.params[k].numel
                self.recent[k] = max(self.recent[k], last)
            self._gather(prefetch, op)
        self.step += 1

    def _release(self, op: int, m: int, forward: bool) -> None:
        keys = set(self.rec.owned[m])
        release = {k for k in keys if not self.params[k].persistent}
        if self.s.complete_trace:  # __params_to_release
            release = {k for k in release if self.recent[k] <= self.step}
            traversed = 0
            for later in itertools.islice(self.trace, self.step, None):
                if traversed >= self.s.max_reuse_distance:
                    break
                for k in self.rec.owned[later]:
                    release.discard(k)
                    traversed += self.params[k].numel
        if not forward:
            extra = self.recompute.pop(m, set())
            release |= {k for k in extra if not self.params[k].persistent}
            keys |= extra
            self.backward.pop(m, None)
        for k in keys:
            self.users[k].discard(m)
        self._free(op, [k for k in keys if k in release])


class _Hook(torch.autograd.Function):
    """What DeepSpeed's ``PreBackwardFunctionForModule`` / ``PostBackwardFunctionModule`` do: a new tensor (no copy)
    whose backward calls ``callback`` when its gradient arrives, before the gradient flows on."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, callback: Any) -> torch.Tensor:
        ctx.callback = callback
        return tensor.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> "tuple[torch.Tensor, None]":
        ctx.callback()
        return grad, None


# ---------------------------------------------------------------------- leaf modules
def leaf_modules(
    named: "Iterable[tuple[str, nn.Module]]", leaves: LeafModules = DEFAULT_LEAF_MODULES
) -> "list[tuple[str, nn.Module]]":
    """The outermost ZeRO-3 leaf modules among ``named`` (a model's ``named_modules()``, the root first), as
    (qualified name, module) pairs in module order.

    A module is a leaf when the config's ``leaf_module`` section matches it (``leaves``, DeepSpeed's default
    classes unless given: :class:`~lightning_memopt.core.deepspeed_config.LeafModules`) or it carries DeepSpeed's
    ``_z3_leaf`` flag (``set_z3_leaf_modules``, or a module inside a running engine). DeepSpeed's registration stops
    at a leaf (``runtime/zero/parameter_offload.py`` ``_register_deepspeed_module``): a leaf inside a leaf is none.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
        >>> net[1]._z3_leaf = True
        >>> [name for name, _ in leaf_modules(net.named_modules())]
        ['1']
    """
    found: list[tuple[str, nn.Module]] = []
    for name, m in named:
        if not name or any(name.startswith(f"{outer}.") for outer, _ in found):  # the root is never one
            continue
        if getattr(m, "_z3_leaf", False) or leaves.matches(name, m):
            found.append((name, m))
    return found


class LeafGradients:
    """When DeepSpeed ZeRO-3 takes the gradients of a leaf module's parameters: all at once, after the module's
    backward, not one by one as they are produced.

    DeepSpeed 0.19.8 (``runtime/zero/stage3.py`` ``create_reduce_and_remove_grad_hooks``) puts no gradient hook on
    a leaf module's parameters; a full backward hook on the module (``reduce_leaf_module_grads``) hands each of
    them to the reduction (``reduce_ready_partitions_and_remove_grads``: copied into the bucket, the gradient freed)
    once the gradients of the module's inputs are computed, a zero gradient for one that got none (an expert no
    token chose). Until then every gradient the module's backward produced stays alive (a Mixtral block's experts:
    ``down_proj``'s through the ``gate_up_proj`` backward).

    Args:
        module: the traced module; its leaf modules (:func:`leaf_modules`) get the hook.
        params: the tensors the trace uses as the parameters, by qualified name (the fakes); the trainable ones of
            a leaf module are held.
        hand_over: called with each held parameter, its ``grad`` set, when DeepSpeed takes the gradient (it drops
            the ``grad``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> net[0]._z3_leaf = True
        >>> taken = []
        >>> def take(p):
        ...     taken.append(tuple(p.grad.shape))
        ...     p.grad = None
        >>> with LeafGradients(net, dict(net.named_parameters()), take) as leaf:
        ...     net(torch.ones(4, 2).requires_grad_()).sum().backward()
        >>> taken, leaf.holds(net[0].weight), leaf.holds(net[1].weight), net[1].weight.grad is None
        ([(3, 2), (3,)], True, False, False)
    """

    def __init__(
        self,
        module: nn.Module,
        params: "dict[str, torch.Tensor]",
        hand_over: Any,
        leaves: LeafModules = DEFAULT_LEAF_MODULES,
    ) -> None:
        self.leaves: list[tuple[nn.Module, list[torch.Tensor]]] = []
        for name, m in leaf_modules(module.named_modules(), leaves):
            held = {id(t): t for pname, _ in m.named_parameters() if (t := params.get(f"{name}.{pname}")) is not None}
            trainable = [t for t in held.values() if t.requires_grad]
            if trainable:
                self.leaves.append((m, trainable))
        self.hand_over = hand_over
        self._held = {id(p) for _, held in self.leaves for p in held}
        self._handles: list = []

    def holds(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s gradient waits for its leaf module's backward."""
        return id(param) in self._held

    def __enter__(self) -> Self:
        for m, held in self.leaves:
            self._handles.append(m.register_full_backward_hook(lambda *_, held=held: self._reduce(held)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _reduce(self, held: "list[torch.Tensor]") -> None:
        for p in held:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.hand_over(p)

    def leftovers(self) -> None:
        """Hand over the gradients still held (a leaf module whose backward hook did not run)."""
        for _, held in self.leaves:
            for p in held:
                if p.grad is not None:
                    self.hand_over(p)
