"""The live-tensor accountant of a fake-tensor step: bytes of live storages after every op, and real values for the
small tensors a step inspects.

A fake tensor has a shape but no values, so ``bool(mask.all())`` or ``torch.nonzero`` cannot run on one. Eager
code inspects values it computed from constants and inputs (``torch.nn.Transformer`` compares its mask with a
causal one; models check an attention mask for padding). The tracker keeps a real *shadow* of every tensor whose
value is known and small (at most ``SHADOW_LIMIT`` elements): the batch, factory outputs (``ones``, ``arange``) and
whatever is computed from shadows alone. An op that needs a value (``_local_scalar_dense``, ``nonzero``) is answered
from the shadows, exactly as the eager step would. Outputs of ``DEFER_FROM`` elements or more are computed only when
an op reads them (every deferred op is computed before an op writes into a known value, so each reads what it would
have read). Parameters and activations never get shadows: nothing big is ever
allocated.

A value that depends on the weights (the loss, a router's choice) is unknown without running the model. Where it
cannot change memory (``loss.item()`` logged) it gets a stand-in; where it can, the tracker assumes what a training
step normally sees, and says so:

* ``isnan`` / ``isinf`` / ``isfinite`` of an activation: its values are finite (``if torch.isnan(loss)`` is
  false); a non-finite first step would end in a skipped or diverged step anyway.
* the indices of ``topk`` / ``sort`` / ``argmax`` / ``max(dim)`` of an activation (a router's experts): spread
  evenly, each row its own distinct choices (balanced routing). A data-dependent size computed from them
  (``nonzero``, ``where``, boolean masks of the routing) is then exact for a balanced router: every expert gets
  ``tokens * top_k / experts`` rows, and the total over experts is exact for any router.
* any other unknown value: numbers 0, booleans true (a mask of unknown values keeps every element: an upper bound).

Every data-dependent op the step ran is recorded once per line of the user's code that called it
(:attr:`LiveTensorTracker.depends`), with how its answer was obtained.
"""

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_memopt.core.compat import in_backward, outside_dispatch_modes
from lightning_memopt.predictor.trace.step_context import call_site

#: the largest tensor (elements) whose real value is computed alongside its fake
SHADOW_LIMIT = 1 << 24
#: how a data-dependent value read from the batch itself is described (``LiveTensorTracker.depends``)
FROM_THE_BATCH = "from the batch's values"
#: outputs this large (elements) or larger get their real value when an op first reads it, not when made: CPU's
#: math attention builds a 4096 x 4096 causal mask in every layer that no op of the step ever reads
DEFER_FROM = 1 << 16
_MUTATED: "dict[Any, tuple[int, ...]]" = {}


def _mutated(func: Any) -> "tuple[int, ...]":
    """Positions of the arguments ``func`` writes to (from its schema), cached."""
    if func not in _MUTATED:
        _MUTATED[func] = tuple(
            i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
        )
    return _MUTATED[func]


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of the live storages a fake step creates, after every op.

    Args:
        exclude: storages not counted (the fake parameters, buffers and attributes: model states).
        vocab: the vocabulary size; tensors whose last dimension equals it count as logits too.
        record: keep ``(allocated at, freed at, bytes)`` of every storage (for synthesis).
        fake_mode: the ``FakeTensorMode`` the step runs under (turns stray real tensors into shadowed fakes).
        scratch: the blocks the target device's kernel for an op allocates and frees inside it, from the op and its
            arguments (:func:`~lightning_memopt.predictor.trace.cuda_kernels.kernel_scratch`); counted in the live
            bytes after that op, and recorded as storages freed before the next one. ``None``: none.

    Example:
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> mode = FakeTensorMode()
        >>> tracker = LiveTensorTracker(set(), None, False, mode)
        >>> with mode, tracker:
        ...     a = torch.ones(4, 4)                       # 64 bytes, value known
        ...     b = torch.empty(1024)                      # 4 KiB
        ...     known = bool((a.tril() == a.tril()).all())  # answered from the shadows
        >>> tracker.cur, known  # a and b are alive; the comparison's temporaries are gone
        (4160, True)
    """

    def __init__(
        self,
        exclude: "set[int]",
        vocab: "int | None",
        record: bool,
        fake_mode: Any,
        scratch: "Callable[[Any, tuple[Any, ...]], tuple[int, ...]] | None" = None,
    ) -> None:
        super().__init__()
        self.exclude = exclude
        self.scratch = scratch
        self.vocab = vocab
        self.record = record
        self.fake_mode = fake_mode
        self.sizes: dict[int, tuple[int, bool, int]] = {}  # storage -> (bytes, logits, allocated at)
        self.held: dict[int, tuple[int, int]] = {}  # key -> (bytes, held since): memory held without a tensor
        self.cur = self.cur_logits = self.grads = 0
        self.live: list[int] = []
        self.grad_log: list[int] = []
        self.logit_log: list[int] = []
        self.labels: list[int] = []
        self.storages: list[tuple[int, int, int, int]] = []  # (allocated at, freed at, bytes, storage key)
        self.label: Callable[[], int] | None = None
        #: called with (storage, tensor) for an op's output that aliases an excluded (model-state) storage
        self.on_state_alias: Callable[[int, torch.Tensor], Any] | None = None
        self._paused = False
        self.shadow = _Shadows()
        #: ``(op, where, how)`` of every data-dependent op answered, in order (``where``: the user's line)
        self.depends: dict[tuple[str, str, str], None] = {}
        #: index in ``live`` of the last op before the first backward op (``None``: no backward yet)
        self.backward_at: int | None = None
        #: called once when the first backward op runs (the step called ``backward`` itself)
        self.on_backward: Callable[[], Any] | None = None

    @property
    def assumed(self) -> bool:
        """Whether a data-dependent value of the step was assumed (balanced routing, a stand-in for a value of the
        weights) rather than read from the batch: the run's steps may then take other paths (other experts)."""
        return any(how != FROM_THE_BATCH for _, _, how in self.depends)

    # ------------------------------------------------------------------ accounting
    def add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.exclude and self.on_state_alias is not None:
            self.on_state_alias(key, t)
        if key in self.sizes or key in self.exclude:
            return
        nbytes = st.nbytes()
        logits = bool(self.vocab) and t.dim() > 0 and t.shape[-1] == self.vocab
        self.sizes[key] = (nbytes, logits, len(self.live))
        weakref.finalize(st, self._gone, key)
        self.cur += nbytes
        self.cur_logits += nbytes if logits else 0

    def _gone(self, key: int) -> None:
        nbytes, logits, born = self.sizes.pop(key, (0, False, 0))
        self.cur -= nbytes
        self.cur_logits -= nbytes if logits else 0
        if self.record and nbytes:
            self.storages.append((born, len(self.live), nbytes, key))

    def hold(self, key: int, nbytes: int) -> None:
        """Count ``nbytes`` under ``key`` until :meth:`release` (memory a tensor does not own: a ZeRO-3 parameter
        kept gathered)."""
        self.held[key] = (nbytes, len(self.live))
        self.cur += nbytes

    def release(self, key: int) -> None:
        nbytes, born = self.held.pop(key)
        self.cur -= nbytes
        if self.record:
            self.storages.append((born, len(self.live), nbytes, key))

    def finished(self) -> "list[tuple[int, int, int, int]]":
        """Every recorded storage, those still alive freed at the end."""
        end = len(self.live)
        alive = [(born, end, n, key) for key, (n, _, born) in self.sizes.items()]
        alive += [(born, end, n, key) for key, (n, born) in self.held.items()]
        return self.storages + alive

    def mark(self) -> None:
        """Record the moment after an op (or after a gradient reached the engine)."""
        self.live.append(self.cur)
        self.grad_log.append(self.grads)
        self.logit_log.append(self.cur_logits)
        if self.label is not None:
            self.labels.append(self.label())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run ops without accounting them (the tracker's own bookkeeping ops)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # ------------------------------------------------------------------ shadows
    def shadowed(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Give ``fake`` the real value ``real`` (when small enough); returns ``fake``."""
        if real.numel() <= SHADOW_LIMIT:
            self.shadow.put(fake, real)
        return fake

    def _known(self, flat: "list[Any]") -> "list[Any] | None":
        """The real counterparts of ``flat`` (tensors by their shadows, deferred ones as they are), or ``None`` when
        one is unknown."""
        if not self.shadow and any(isinstance(a, torch.Tensor) for a in flat):
            return None
        out = []
        for a in flat:
            if isinstance(a, torch.Tensor):
                real = self.shadow.get(a, compute=False)
                if real is None:
                    return None
                a = real
            out.append(a)
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        kwargs = kwargs or {}
        if self._paused or func.namespace == "prim":  # prim: metadata queries of fake tensors, no storage
            return func(*args, **kwargs)
        if self.backward_at is None and in_backward():
            self.backward_at = len(self.live) - 1
            if self.on_backward is not None:
                self.on_backward()
        flat, spec = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor) for a in flat):
            flat = [self._as_fake(a) for a in flat]
            args, kwargs = tree_unflatten(flat, spec)
        real = self._known(flat)  # deferred values (_Deferred) not computed yet
        try:
            fix = _FAKE_KERNEL_FIXES.get(func)
            out = fix(func, args, kwargs) if fix is not None else func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as err:
            out = self._data_dependent(func, args, kwargs, flat, spec, _computed(real), err)
            outputs = _tensors(out)
        else:
            outputs = _tensors(out)
            if real is not None and all(t.numel() <= SHADOW_LIMIT for t in outputs):
                notes = self.shadow.notes_of(flat)
                written = _mutated(func)
                deferred = _Deferred(func, real, spec)
                if outputs and not written and deferred.depth <= 64 and all(t.numel() >= DEFER_FROM for t in outputs):
                    self.shadow.defer(deferred)
                    values: "list[Any]" = [_Output(deferred, i) for i in range(len(outputs))]
                else:
                    if written:  # an op that writes a value must not change what a deferred op reads
                        self.shadow.compute_pending()
                    values = _tensors(_run_real(func, _computed(real), spec))
                for fake, value in zip(outputs, values):
                    self.shadow.put(fake, value, notes)
            elif real is None:
                if self.shadow:  # a written argument whose new value is unknown loses its shadow
                    for i in _mutated(func):
                        if i < len(args) and isinstance(args[i], torch.Tensor):
                            self.shadow.drop(args[i])
                self._assume(func, args, kwargs, out)
        for t in outputs:
            self.add(t)
        scratch = [n for n in self.scratch(func, args) if n] if self.scratch is not None else []
        tokens = [object() for _ in scratch]  # the kernel's own temporaries, alive with its outputs
        for token, nbytes in zip(tokens, scratch):
            self.hold(id(token), nbytes)
        self.mark()
        for token in tokens:  # freed as it returns
            self.release(id(token))
        return out

    # ------------------------------------------------------------------ data-dependent ops
    def _data_dependent(self, func: Any, args: Any, kwargs: Any, flat: "list[Any]", spec: Any, real: Any,
                        err: Exception) -> Any:  # fmt: skip
        """The answer of an op whose output (a value, or a shape) depends on tensor values: from the shadows, else
        from stand-ins; recorded in :attr:`depends`. Raises ``err`` where no answer can be computed."""
        op = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
        op = f"aten.{op}" if func.namespace == "aten" else f"{func.namespace}.{op}"
        try:
            if func in _INDEX_OPS and _bool_indices(args):
                out, notes = self._long_indexed(func, args, kwargs, flat)
            elif real is not None:
                notes = self.shadow.notes_of(flat)
                real_out = _run_real(func, real, spec)  # the value the eager step would see
                out = tree_map(lambda r: self._fake_of(r, notes), real_out)
            else:
                values, notes = self._values(flat)
                real_out = _run_real(func, values, spec)
                if func is torch.ops.aten._local_scalar_dense.default and not self.shadow.notes_of(flat):
                    notes = frozenset({f"a stand-in {real_out!r} for a value of the weights (it steers no shape)"})
                out = tree_map(lambda r: self._fake_of(r, notes), real_out)
        except Exception:
            raise err from None
        how = "; ".join(sorted(notes)) if notes else FROM_THE_BATCH
        self.depends.setdefault((op, call_site(), how), None)
        return out

    def _values(self, flat: "list[Any]") -> "tuple[list[Any], frozenset[str]]":
        """Real values for ``flat``: shadows, else free stand-ins (a broadcast scalar: 0, booleans true)."""
        out, notes = [], set()
        for a in flat:
            if isinstance(a, torch.Tensor):
                real = self.shadow.get(a)
                if real is None:
                    fill = True if a.dtype == torch.bool else 0
                    with outside_dispatch_modes():
                        real = torch.full((), fill, dtype=a.dtype, device=a.device).expand(a.shape)
                    notes.add("every element of a mask of values of the weights kept (an upper bound)"
                              if a.dtype == torch.bool else "0 for values of the weights")
                a = real
            out.append(a)
        return out, frozenset(notes | set(self.shadow.notes_of(flat)))

    def _long_indexed(self, func: Any, args: Any, kwargs: Any, flat: "list[Any]") -> "tuple[Any, frozenset[str]]":
        """Index with a boolean mask as with the integer indices of its true elements (what the eager kernel
        does): the mask's value from its shadow (or a stand-in); the indexed tensor stays fake."""
        indices, notes = [], set(self.shadow.notes_of(flat))
        for index in args[1]:
            if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                (mask,), extra = self._values([index])
                notes |= extra
                with outside_dispatch_modes():
                    rows = mask.nonzero()
                indices += [self._fake_of(rows[:, i].clone(), frozenset(notes)) for i in range(rows.shape[1])]
            else:
                indices.append(index)
        return func(args[0], indices, *args[2:], **kwargs), frozenset(notes)

    def _assume(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Shadows for the outputs of ops on unknown values whose value a step may inspect (see the module)."""
        if func in _FINITE:
            where = call_site()
            with outside_dispatch_modes():
                value = torch.full((), _FINITE[func], dtype=torch.bool, device=out.device).expand(out.shape)
            self.shadow.put(out, value, frozenset({f"values assumed finite ({func.overloadpacket.__name__} at"
                                                   f" {where})"}))  # fmt: skip
        elif func in _INDEXING:
            pos, dim, k = _INDEXING[func](args, kwargs)
            index = out[pos] if isinstance(out, (tuple, list)) else out
            source = args[0]
            size = source.numel() if dim is None else (source.shape[dim] if source.dim() else 1)
            if index.numel() > SHADOW_LIMIT or size == 0:
                return
            where = call_site()
            with outside_dispatch_modes():
                value = _balanced(tuple(index.shape), None if dim is None or k is None else dim % max(1, index.dim()),
                                  size, index.device)  # fmt: skip
            self.shadow.put(index, value, frozenset({f"balanced routing assumed ({func.overloadpacket.__name__} at"
                                                     f" {where}: every choice equally often)"}))  # fmt: skip

    def _as_fake(self, a: Any) -> Any:
        """A real tensor that reaches the step (a constant held outside the module) becomes a shadowed fake."""
        if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor) and a.device.type != "meta":
            return self.shadowed(self.fake_mode.from_tensor(a), a)
        return a

    def _fake_of(self, real: Any, notes: "frozenset[str]" = frozenset()) -> Any:
        if not isinstance(real, torch.Tensor):
            return real
        fake = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=real.device)
        if real.numel() <= SHADOW_LIMIT:
            self.shadow.put(fake, real, notes)
        return fake


class _Shadows:
    """Real values of fake tensors, keyed by the fake's identity (tensors compare element-wise, so no dict key),
    dropped when the fake dies; with the assumptions a value rests on (empty: it follows from the batch and the
    constants)."""

    def __init__(self) -> None:
        self._values: dict[int, Any] = {}  # a tensor, or an _Output computed on first use
        self._notes: dict[int, frozenset[str]] = {}
        self.pending: list[weakref.ref] = []  # deferred ops, while a shadow still holds them

    def clear(self) -> None:
        """Drop every shadow: their real tensors are freed now, not when the fakes' reference cycles are collected
        (a copy of the batch would otherwise outlive the trace into the step the monitor measures)."""
        self._values.clear()
        self._notes.clear()
        self.pending.clear()

    def defer(self, deferred: "_Deferred") -> None:
        self.pending.append(weakref.ref(deferred))
        if len(self.pending) > 256:
            self.pending = [ref for ref in self.pending if ref() is not None]

    def compute_pending(self) -> None:
        """Compute every deferred op still held (before an op writes into a value one of them may read)."""
        for ref in self.pending:
            deferred = ref()
            if deferred is not None:
                deferred.compute()
        self.pending.clear()

    def put(self, fake: torch.Tensor, real: Any, notes: "frozenset[str]" = frozenset()) -> None:
        key = id(fake)
        if key not in self._values:
            weakref.finalize(fake, self._forget, key)
        self._values[key] = real
        if notes:
            self._notes[key] = notes
        else:
            self._notes.pop(key, None)

    def _forget(self, key: int) -> None:
        self._values.pop(key, None)
        self._notes.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self._values)

    def get(self, fake: torch.Tensor, compute: bool = True) -> Any:
        """The shadow of ``fake`` (``None``: none); a deferred one is computed unless ``compute`` is false."""
        value = self._values.get(id(fake))
        if compute and isinstance(value, _Output):
            value = self._values[id(fake)] = value.value()
        return value

    def notes_of(self, flat: "list[Any]") -> "frozenset[str]":
        """The assumptions the values of the tensors in ``flat`` rest on."""
        if not self._notes:
            return frozenset()
        return frozenset().union(*(self._notes.get(id(a), ()) for a in flat if isinstance(a, torch.Tensor)))

    def drop(self, fake: torch.Tensor) -> None:
        self._values.pop(id(fake), None)
        self._notes.pop(id(fake), None)


class _Deferred:
    """An op on known values whose outputs are large: run when one of its outputs' values is first read."""

    __slots__ = ("__weakref__", "depth", "flat", "func", "outputs", "spec")

    def __init__(self, func: Any, flat: "list[Any]", spec: Any) -> None:
        self.func, self.flat, self.spec = func, flat, spec
        self.outputs: "list[torch.Tensor] | None" = None
        #: deferred ops in a row up to this one (a long chain is computed as it comes, not recursively)
        self.depth = 1 + max((a.deferred.depth for a in flat if isinstance(a, _Output)), default=0)

    def compute(self) -> "list[torch.Tensor]":
        if self.outputs is None:
            self.outputs = _tensors(_run_real(self.func, _computed(self.flat), self.spec))
            self.flat = []  # what it read is no longer held
        return self.outputs


class _Output:
    """The ``index``-th output of a deferred op."""

    __slots__ = ("deferred", "index")

    def __init__(self, deferred: _Deferred, index: int) -> None:
        self.deferred, self.index = deferred, index

    def value(self) -> torch.Tensor:
        return self.deferred.compute()[self.index]


def _computed(flat: "list[Any] | None") -> "list[Any] | None":
    """``flat`` with every deferred value computed."""
    if flat is None:
        return None
    return [a.value() if isinstance(a, _Output) else a for a in flat]


def _run_real(func: Any, flat: "list[Any]", spec: Any) -> Any:
    """Run ``func`` eagerly on real tensors, outside the fake mode and the tracker."""
    args, kwargs = tree_unflatten(flat, spec)
    with outside_dispatch_modes():
        return func(*args, **kwargs)


def _tensors(out: Any) -> "list[torch.Tensor]":
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _grouped_mm(func: Any, args: Any, kwargs: Any) -> torch.Tensor:
    """``_grouped_mm`` (transformers 5's grouped MoE experts): the fake kernel (torch 2.13 ``meta__grouped_mm``)
    accepts bf16 only, the CPU kernel runs fp32 too. Shape an fp32 call in bf16, answer in the eager dtype."""
    if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
        return func(*args, **kwargs)
    cast = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    shaped = func(*cast, **kwargs)
    return torch.empty(shaped.shape, dtype=kwargs.get("out_dtype") or args[0].dtype, device=shaped.device)


def _norm_statistics(func: Any, args: Any, kwargs: Any) -> Any:
    """``native_layer_norm`` / ``native_batch_norm`` of a 16-bit input with fp32 weights (autocast keeps norms in
    the weights' dtype): the CPU kernels return the saved mean and inverse deviation in fp32, the fake kernels in
    the input's dtype (torch 2.13). Answer with the eager dtypes."""
    out = func(*args, **kwargs)
    weight = args[2] if func is torch.ops.aten.native_layer_norm.default else args[1]
    if args[0].dtype in (torch.float16, torch.bfloat16) and getattr(weight, "dtype", None) == torch.float32:
        return (out[0], *(torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in out[1:]))
    return out


#: ops whose fake kernel disagrees with the eager CPU kernel about what it allocates, and the correction
_FAKE_KERNEL_FIXES = {
    torch.ops.aten._grouped_mm.default: _grouped_mm,
    torch.ops.aten.native_layer_norm.default: _norm_statistics,
    torch.ops.aten.native_batch_norm.default: _norm_statistics,
}


#: index ops whose boolean-mask indices make the output shape data-dependent
_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


def _bool_indices(args: Any) -> bool:
    return len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    )


#: checks of non-finite values and their answer for finite values
_FINITE = {
    torch.ops.aten.isnan.default: False,
    torch.ops.aten.isinf.default: False,
    torch.ops.aten.isposinf.default: False,
    torch.ops.aten.isneginf.default: False,
    torch.ops.aten.isfinite.default: True,
}


def _arg(args: Any, kwargs: Any, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


#: ops that return indices chosen by values: (position of the indices in the output, dim, k) from the arguments
_INDEXING: "dict[Any, Callable[[Any, Any], tuple[int, int | None, int | None]]]" = {
    torch.ops.aten.topk.default: lambda a, k: (1, _arg(a, k, 2, "dim", -1), _arg(a, k, 1, "k", 1)),
    torch.ops.aten.sort.default: lambda a, k: (1, _arg(a, k, 1, "dim", -1), -1),
    torch.ops.aten.sort.stable: lambda a, k: (1, _arg(a, k, 2, "dim", -1), -1),
    torch.ops.aten.max.dim: lambda a, k: (1, _arg(a, k, 1, "dim", 0), None),
    torch.ops.aten.min.dim: lambda a, k: (1, _arg(a, k, 1, "dim", 0), None),
    torch.ops.aten.argmax.default: lambda a, k: (0, _arg(a, k, 1, "dim", None), None),
    torch.ops.aten.argmin.default: lambda a, k: (0, _arg(a, k, 1, "dim", None), None),
}


def _balanced(shape: "tuple[int, ...]", dim: "int | None", size: int, device: torch.device) -> torch.Tensor:
    """Indices into ``size`` choices, spread evenly: along ``dim`` (``None``: one choice per position) each row takes
    its next distinct choices, rows following on where the last one stopped.

    Example:
        >>> _balanced((3, 2), 1, 4, torch.device("cpu")).tolist()  # top-2 of 4 experts for 3 tokens
        [[0, 1], [2, 3], [0, 1]]
        >>> _balanced((5,), None, 2, torch.device("cpu")).tolist()  # argmax of 2 classes for 5 rows
        [0, 1, 0, 1, 0]
    """
    n = math.prod(shape)
    if dim is None or not shape:
        return (torch.arange(n, device=device) % size).reshape(shape)
    k = shape[dim]
    rows = torch.arange(n // max(1, k), device=device)[:, None] * k + torch.arange(k, device=device)[None, :]
    moved = (*shape[:dim], *shape[dim + 1 :], k)
    return (rows % size).reshape(moved).movedim(-1, dim)
