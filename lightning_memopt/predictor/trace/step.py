"""Trace one training step of any ``nn.Module`` under fake tensors and account every byte.

Nothing is allocated: parameters, buffers, tensors held as plain attributes and the batch become
:class:`~torch._subclasses.fake_tensor.FakeTensor` s (shapes, dtypes and storages without data), and a
``TorchDispatchMode`` follows every storage the step creates until it dies (``weakref`` on the untyped storage), so the
result is the live-tensor timeline of the real eager step (the same kernels run their shape functions; SDPA and autocast
take their real paths, which the meta device does not). The step is traced on the device the module is on
(:func:`trace_device`): a module on a GPU with CUDA's kernels and autocast rules, a CPU or meta module on the CPU.
Gradients of trainable parameters are reported to a post-accumulate hook and dropped, so the timeline says, after every
op, how many bytes of activations, logits and temporaries are live and how many gradient bytes the engine has received;
each engine then keeps what it keeps (:mod:`lightning_memopt.predictor.account.model_states`). Parameters, buffers and
attributes are the model states' and are not in the timeline.

Where a fake kernel is missing or disagrees with the eager one, the tracker fixes it locally:

* ``aten._grouped_mm`` (transformers 5's grouped MoE experts): its fake kernel demands bf16 although the CPU kernel
  runs fp32; an fp32 call is shaped by the bf16 kernel and returns an fp32 tensor.
* ``aten.native_layer_norm`` / ``native_batch_norm`` on a 16-bit input with fp32 weights (autocast): the CPU kernels
  save fp32 statistics, the fake kernels claim 16-bit ones.

A step may inspect values (``.item()``, ``.tolist()``, ``if torch.isnan(loss)``) and make shapes from them
(``nonzero``, boolean masks, eager MoE routing): the tracker answers from the batch's real values, or from stated
assumptions where a value comes from the weights (:mod:`.tracker`); :attr:`TraceResult.depends_on_batch` lists every
such op with the user's line that called it. The step may run its own backward (manual optimization, several
optimizers): the forward ends where the first backward op runs, and each trainable parameter's gradient is handed to
the engine once; the optimizers it calls are stepped over (the real parameters and states are left alone) and a
``zero_grad`` before the forward frees the previous step's gradients there. Compiled sub-modules
(``torch.compile``) run eagerly in the trace, and the Python state the step changes on the module (a list of losses)
is put back. A step whose value cannot be computed even so raises with the
op's name, the user's line and what to do instead.
"""

import contextlib
import dataclasses
import functools
import itertools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_memopt.core import compat as _compat
from lightning_memopt.core.blocks import checkpointed_as, own_checkpoints
from lightning_memopt.core.deepspeed_config import DEFAULT_LEAF_MODULES
from lightning_memopt.core.modules import find_hf_model, tensor_attributes
from lightning_memopt.predictor.device import KernelDevice
from lightning_memopt.predictor.precision import Precision
from lightning_memopt.predictor.trace import step_context
from lightning_memopt.predictor.trace.cuda_kernels import cuda_kernels, kernel_scratch
from lightning_memopt.predictor.trace.tracker import SHADOW_LIMIT, LiveTensorTracker
from lightning_memopt.predictor.trace.zero3 import LeafGradients, Zero3Gathering, Zero3Settings, gathered_bytes

#: a function from one step's batch to its loss; the default steps a LightningModule or calls the module
StepFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class TraceResult:
    """What one fake training step (forward + backward) did to memory, model states excluded.

    Attributes:
        live: bytes of live tensors after each op (activations, logits, temporaries, gradients in flight before
            they reach the engine).
        grads: gradient bytes handed to the engine so far, at the same moments.
        logits: of ``live``, the bytes of tensors whose last dimension is the vocabulary.
        forward_end: index in ``live`` of the last op of the forward pass (the loss).
        saved_bytes: bytes saved for backward at the end of forward (de-duplicated by storage).
        grad_bytes: gradient bytes of one backward.
        labels: per op, the index of the block running it (``-1`` outside blocks), when blocks were marked.
        markers: ``(op index, block index, "forward" | "backward", storages freed before)`` where a skipped block
            passed (synthesis).
        storages: ``(allocated at, freed at, bytes, storage key)`` of every storage the step created (``freed at`` =
            ``len(live)`` when it outlived the step), when recorded.
        gathered: of ``live``, the ZeRO-3 parameters gathered after each op (empty without ``zero3`` settings).
        grad_keys: ``(storage key, op index)`` of the gradients handed to the engine, in arrival order (when
            recorded).
        depends_on_batch: ``"op at file:line: how its value was obtained"`` for every data-dependent op the step ran
            (a value read, a size made from values), once per op and line of the user's code.
        released_before_forward: the fraction of the trainable parameters' bytes whose previous gradients the step
            freed before its first op (a manual step's ``zero_grad`` first); the others' are alive through the
            forward, as in Lightning's automatic optimization (0).
        own_checkpoints: ``"file:line"`` of every ``torch.utils.checkpoint`` call of the model's own code that opened
            a region in the forward, once per line (see :func:`~lightning_memopt.core.blocks.own_checkpoints`).
        grad_order: the trainable parameters (their indices in registration order, the order of
            :meth:`~lightning_memopt.predictor.read.reading.ModelReading.trainable`) in the order their gradients
            reached the engine (ZeRO-1/2's reduce buckets fill in it); empty for a reduced-depth trace (``blocks``).
        ungraded: the names (as :func:`~lightning_memopt.predictor.read.reading.read_model` gives them) of the
            trainable parameters the step ran without a gradient reaching them (a module the step does not use:
            Longformer's global-attention projections without global tokens); empty when no gradient reached any,
            or when the step's path rests on assumed values (balanced routing: the run routes to other experts).
            Torch's optimizers skip a parameter whose ``.grad`` is ``None``: it gets no optimizer states.
        checkpointed_as_is: the ``activation_checkpointing`` setting was set aside: it would have wrapped blocks of a
            model that checkpoints itself (``own_checkpoints``), which is traced as it is.
        zero3_events: a reduced-depth trace under ZeRO-3 settings: DeepSpeed's events as recorded, not replayed
            (``gathered`` is then empty and ``live`` holds no gathered parameter); synthesis writes them out at full
            depth and replays them (:mod:`.expand`).
    """

    live: "tuple[int, ...]"
    grads: "tuple[int, ...]"
    logits: "tuple[int, ...]"
    forward_end: int
    saved_bytes: int
    grad_bytes: int
    labels: "tuple[int, ...]" = ()
    markers: "tuple[tuple[int, int, str, int], ...]" = ()
    storages: "tuple[tuple[int, int, int, int], ...]" = ()
    gathered: "tuple[int, ...]" = ()
    grad_keys: "tuple[tuple[int, int], ...]" = ()
    depends_on_batch: "tuple[str, ...]" = ()
    released_before_forward: float = 0.0
    own_checkpoints: "tuple[str, ...]" = ()
    grad_order: "tuple[int, ...]" = ()
    ungraded: "tuple[str, ...]" = ()
    checkpointed_as_is: bool = False
    zero3_events: Any = None

    def gradient_records(self) -> "set[int]":
        """Indices into ``storages`` of the gradients handed to the engine: for each ``(key, at)`` of ``grad_keys``,
        the storage with that key alive across the hand-over (keys are reused once a storage is freed)."""
        by_key: "dict[int, list[int]]" = {}
        for i, (_, _, _, key) in enumerate(self.storages):
            by_key.setdefault(key, []).append(i)
        out = set()
        for key, at in self.grad_keys:
            for i in by_key.get(key, ()):
                b, f = self.storages[i][0], self.storages[i][1]
                if b <= at <= f <= at + 2:
                    out.add(i)
                    break
        return out

    @property
    def peak(self) -> int:
        """Highest live bytes of the step (gradients excluded).

        Example:
            >>> TraceResult((5, 9, 4), (0, 0, 8), (0, 0, 0), 1, 5, 8).peak
            9
        """
        return max(self.live, default=0)


def default_step(module: nn.Module, batch: Any) -> Any:
    """One training step's output, as Lightning keeps it until backward ends (the step of a
    :func:`.step_context.stepping` context first, when one hands it in): a LightningModule's ``training_step(batch, 0)``
    (Lightning's closure holds what it returns); any other module is stepped as a ``training_step`` returning
    ``module(**batch).loss`` would (``module(*batch)``, ``module(batch)`` alike): its output, logits included, is freed
    before backward (so do Hugging Face's Trainer and most loops)."""
    handed = step_context.current_step()
    if handed is not None:
        out = handed(module, batch)
        if out is not NotImplemented:
            return out
    step = getattr(module, "training_step", None)
    if callable(step):
        return step(batch, 0)
    if isinstance(batch, dict):
        out = module(**batch)
    elif isinstance(batch, (tuple, list)):
        out = module(*batch)
    else:
        out = module(batch)
    return loss_of(out, module)


def loss_of(out: Any, module: nn.Module) -> torch.Tensor:
    """The loss in a step's output: the output itself, ``out["loss"]``, ``out.loss`` or a leading scalar.

    Raises:
        ValueError: the output holds no scalar loss, with the fix.
    """
    if isinstance(out, dict) and "loss" in out:
        out = out["loss"]
    elif not isinstance(out, torch.Tensor) and getattr(out, "loss", None) is not None:
        out = out.loss
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.requires_grad:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            got = "a loss that does not require gradients (no trainable parameter reaches it)"
        raise ValueError(
            f"Expected one training step of {type(module).__name__} to return a scalar loss that requires"
            f" gradients (a tensor, a dict with 'loss' or an output with `.loss`), got {got}."
            " Fix: pass a LightningModule (its training_step is traced), or include the labels in the batch so"
            " that the model computes its loss."
        )
    return out


def trace_step(
    module: nn.Module,
    example_batch: Any,
    precision: Precision,
    engine: str = "deepspeed",
    activation_checkpointing: "bool | float | int | None" = None,
    attention: "str | None" = None,
    zero3: "bool | Zero3Settings" = False,
    step: "StepFn | None" = None,
    blocks: "Any" = None,
    record: bool = False,
    cuda: "bool | KernelDevice" = False,
    autocast_cache: bool = False,
) -> TraceResult:
    """Trace forward + backward of ``module`` on ``example_batch`` with fake tensors.

    Parameters (frozen ones too), buffers and plain tensor attributes are replaced for the duration of the call by
    fake tensors in the dtype the engine holds them in: DeepSpeed casts the module (parameters and buffers) to
    fp16/bf16 for 16-bit precisions; plain torch ``*-mixed`` keeps fp32 weights under autocast. The module itself
    is not changed and no real memory is allocated for it, so a meta-device module works too.

    Args:
        module: the model.
        example_batch: one micro-batch (tensors, or dicts/tuples of tensors); only shapes and dtypes are used.
        precision: the resolved precision.
        engine: ``"deepspeed"`` or ``"torch"``.
        activation_checkpointing: ``None`` traces the blocks checkpointed as they are; ``True``/``False``, a fraction
            or a number checkpoints exactly the first blocks it says (the others not) for the trace, each with the
            checkpointing the model has for it (:func:`~lightning_memopt.core.blocks.checkpointed_as`: a Hugging
            Face layer with its own function). A model whose own code calls ``torch.utils.checkpoint`` is traced as
            it is: no wrapper is put on top of its own checkpointing.
        attention: set a Hugging Face model's attention implementation for the trace (``None`` keeps it).
        zero3: step as a DeepSpeed ZeRO-3 run does: Linear layers through ``zero3_linear_wrap``, every module's
            tensor inputs as new tensors (``_post_backward_module_hook``), and a parameter whose view is saved for
            backward kept gathered (counted) until that saved view is released, and the gradients of a ZeRO-3 leaf
            module's parameters handed to the engine once its backward ends
            (:class:`~lightning_memopt.predictor.trace.zero3.LeafGradients`). With
            :class:`~lightning_memopt.predictor.trace.zero3.Zero3Settings`, also the parameters DeepSpeed gathers along
            the step, op by op (in ``live`` and ``gathered``).
        step: ``(module, batch) -> output`` holding the loss (default :func:`default_step`); a step that runs
            backward itself (manual optimization) may return anything.
        blocks: a :class:`~lightning_memopt.predictor.trace.synthesis.Replica` that marks blocks and skips some of them.
        cuda: trace a step that runs on a CUDA device: on the CPU, with CUDA's kernels where the CPU's take another
            path (:func:`~lightning_memopt.predictor.trace.cuda_kernels.cuda_kernels`), and with the temporaries
            CUDA's kernels allocate inside an op (:func:`~.cuda_kernels.kernel_scratch`), sized for this
            :class:`~lightning_memopt.predictor.device.KernelDevice` (``True``: an H100).
        autocast_cache: run the step's autocast with its weight-cast cache (``torch.autocast``'s default, a plain
            loop's and Lightning Fabric's), which keeps every weight's 16-bit copy until the step's autocast exits;
            ``False``: as Lightning's ``*-mixed`` precision plugin runs it.
        record: keep every storage's lifetime (``storages``) and the gradients' storage keys (``grad_keys``), for
            the caching allocator's replay (:mod:`lightning_memopt.predictor.account.cuda_replay`).

    Raises:
        ValueError: no scalar loss, or a step whose shapes depend on the data.

    Example:
        >>> from lightning_memopt.predictor.precision import resolve_precision
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> res = trace_step(net, torch.zeros(4, 8), resolve_precision("32-true"), step=lambda m, b: m(b).sum())
        >>> res.grad_bytes == 4 * sum(p.numel() for p in net.parameters()), res.peak > 0
        (True, True)
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = precision.param_dtype(engine)
    device = trace_device(module, example_batch)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    exclude: set[int] = set()  # the model states' fake storages: not the step's
    kernels = cuda if isinstance(cuda, KernelDevice) else KernelDevice()
    scratch = functools.partial(kernel_scratch, device=kernels) if cuda else None
    tracker = LiveTensorTracker(exclude, _vocab_size(module), blocks is not None or record, fake_mode, scratch)
    grad_keys: list[tuple[int, int]] = []  # (storage, op index) of each gradient handed to the engine, in order
    saved: dict[int, int] = {}
    pinned: dict[int, int] = {}  # parameter storage -> live saved views of it (ZeRO-3 keeps it gathered)
    param_ids: set[int] = set()
    grad_bytes = 0
    graded: set[int] = set()  # a parameter's gradient reaches the engine once (a second backward adds into it)
    position: dict[int, int] = {}  # trainable fake parameter -> its index in registration order
    grad_order: list[int] = []

    def hand_over(p: torch.Tensor) -> None:
        nonlocal grad_bytes
        if p.grad is not None:
            if id(p) not in graded:
                graded.add(id(p))
                nbytes = p.grad.untyped_storage().nbytes()
                grad_keys.append((p.grad.untyped_storage()._cdata, len(tracker.live)))
                grad_order.append(position[id(p)])
                tracker.grads += nbytes
                grad_bytes += nbytes
            p.grad = None
        tracker.mark()

    def on_grad(p: torch.Tensor) -> None:
        if leaf is not None and leaf.holds(p):  # ZeRO-3 takes it after its leaf module's backward
            tracker.mark()
        else:
            hand_over(p)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            if st._cdata not in exclude:
                saved[st._cdata] = st.nbytes()
            elif zero3 and id(t) not in param_ids and (gathering is None or not gathering.pin(st._cdata, t)):
                _pin(st._cdata, st.nbytes(), t)
        return t

    def _pin(key: int, nbytes: int, view: torch.Tensor) -> None:
        if key not in pinned:
            pinned[key] = 0
            tracker.hold(key, nbytes)
        pinned[key] += 1

        def _unpin(key: int = key) -> None:
            pinned[key] -= 1
            if not pinned[key]:
                del pinned[key]
                tracker.release(key)

        weakref.finalize(view, _unpin)

    moved: dict[int, torch.Tensor] = {}

    def to_fake(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point() and dtype is not None and dtype != torch.float32:
            # a module run in 16 bits gets 16-bit inputs (Lightning's DeepSpeed and *-true precisions convert them)
            x = x.to(dtype) if x.device.type != "meta" else x.new_empty(x.shape, dtype=dtype)
        if x.device.type == "meta" or x.device != device:  # one fake for a tensor passed twice (labels = inputs)
            if id(x) not in moved:
                moved[id(x)] = _fake_like(x, x.dtype, device, fake_mode)
            fake = moved[id(x)]
        else:
            fake = fake_mode.from_tensor(x)  # keeps the batch's aliasing
        if x.device.type == "meta" or x.numel() > SHADOW_LIMIT:
            return fake
        # the batch's values are known: the step may inspect them (padding checks), as the eager one does
        return tracker.shadowed(fake, x.detach().to(device, copy=True))

    batch = tree_map(to_fake, example_batch)
    for t in tree_flatten(batch)[0]:  # the batch is on the device through the whole step
        tracker.add(t)
    # Lightning's MixedPrecision runs the step under ``torch.autocast(..., cache_enabled=False)``
    # (lightning/pytorch/plugins/precision/amp.py, 2.6): no weight cast outlives the op that made it unless autograd
    # saves it (with the cache, a plain loop's, a checkpointed block's casts live until the forward ends)
    autocast = (
        torch.autocast(device.type, dtype=precision.compute_dtype, cache_enabled=bool(autocast_cache))
        if engine == "torch" and precision.mixed
        else contextlib.nullcontext()
    )
    released: dict[int, int] = {}  # real parameter -> elements whose gradients the step freed before its forward
    real_trainable = {id(p): p.numel() for p in module.parameters() if p.requires_grad}
    real_names = {id(p): name for name, p in module.named_parameters()}  # each tensor once, under its first name
    fake_names: dict[int, str] = {}  # trainable fake parameter -> its real parameter's name

    def on_release(params: Any) -> None:
        if len(tracker.live) == step_start:  # no op of the step ran yet
            chosen = real_trainable if params is None else {id(p): real_trainable.get(id(p), 0) for p in params}
            released.update(chosen)

    step_start = 0
    saved_at_backward: list[int] = []  # bytes saved for backward when the first backward op ran
    tracker.on_backward = lambda: saved_at_backward.append(sum(saved.values()))
    gathering: Zero3Gathering | None = None
    leaf: LeafGradients | None = None
    was_training = module.training
    module.train()
    handles: list = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(step_context.preserved_state(module))  # what the step's Python code changes
            stack.enter_context(torch.compiler.set_stance("force_eager"))  # compiled sub-modules run their code
            stack.enter_context(_compat.deepspeed_hooks_suspended(module))  # a module inside a running engine
            stack.enter_context(_compat.linear_of_the_run(zero3))
            stack.enter_context(_compat.no_packed_sequence_detection())
            stack.enter_context(_compat.fake_tensors_run_eagerly())
            stack.enter_context(step_context.attention(module, attention))
            wrapped = stack.enter_context(checkpointed_as(module, activation_checkpointing))
            own = stack.enter_context(own_checkpoints())
            if blocks is not None:  # the skipped blocks leave the module: their states need no fakes
                stack.enter_context(blocks.installed(module, tracker))
            fakes, trainable = _fake_states(module, fake_mode, dtype, device)
            every = module.named_parameters(remove_duplicate=False)
            fake_names.update((id(fakes[n]), real_names[id(p)]) for n, p in every if id(p) in real_names)
            fake_attributes = _fake_attributes(module, fake_mode, tracker, device)
            exclude.update(t.untyped_storage()._cdata for t in fakes.values())
            exclude.update(t.untyped_storage()._cdata for _, t in fake_attributes)
            param_ids.update(id(t) for t in fakes.values())
            if zero3:  # a ZeRO-3 leaf module's gradients are reduced after its backward (MoE blocks)
                leaves = zero3.leaves if isinstance(zero3, Zero3Settings) else DEFAULT_LEAF_MODULES
                leaf = stack.enter_context(LeafGradients(module, fakes, hand_over, leaves))
            handles += [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
            position.update((id(p), i) for i, p in enumerate(trainable))
            stack.enter_context(step_context.swapped_attributes(module, fake_attributes))
            stack.enter_context(_compat.reparametrized(module, fakes))
            stack.enter_context(step_context.zero3_module_inputs(module, zero3))
            if isinstance(zero3, Zero3Settings):  # DeepSpeed's fetch and release events, replayed after the step
                sequence = itertools.count()
                named = blocks.full_modules if blocks is not None else None  # skipped blocks' modules included
                gathering = stack.enter_context(
                    Zero3Gathering(module, zero3, dtype.itemsize, lambda: len(tracker.live), named, sequence)
                )
                tracker.on_state_alias = gathering.state_alias
                if blocks is not None:  # markers take their places among the events; DeepSpeed's hook on a
                    blocks.sequence = sequence  # block's output runs in the block
                    blocks.leave_last()
            if cuda and device.type == "cpu":
                stack.enter_context(cuda_kernels())
            stack.enter_context(fake_mode)
            stack.enter_context(step_context.optimizers_stepped_over(on_release))
            stack.enter_context(tracker)
            with step_context.readable_errors(module), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step_start = len(tracker.live)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                    # the step's output lives until backward ends, as in a training loop (and Lightning's
                    # closure, which keeps what ``training_step`` returned)
                    output = (step or default_step)(module, batch)
                    # a step that handed gradients to the engine ran its own backward (manual optimization)
                    loss = loss_of(output, module) if not graded else None
                if loss is not None:
                    # as in Lightning, autocast covers the training step only (``Precision.train_step_context``):
                    # backward runs outside it, and a checkpointed block's recomputation enters its own autocast
                    forward_end = len(tracker.live) - 1
                    saved_bytes = sum(saved.values())
                    saved.clear()
                    loss.backward()
                else:  # the step ran backward itself (manual optimization): the forward ended before it
                    forward_end = tracker.backward_at
                    saved_bytes = saved_at_backward[0]
                if leaf is not None:
                    leaf.leftovers()
                del loss, output
                tracker.mark()
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
        tracker.shadow.clear()  # the real values (a copy of the batch) go now, not at the next garbage collection
    if own and wrapped:  # the model checkpoints itself: no wrapper of the flag's nested in (or around) its own
        if blocks is not None:  # a fresh replica for the new trace
            blocks.reset()
        res = trace_step(module, example_batch, precision, engine=engine, activation_checkpointing=None,
                         attention=attention, zero3=zero3, step=step, blocks=blocks, record=record, cuda=cuda,
                         autocast_cache=autocast_cache)  # fmt: skip
        return dataclasses.replace(res, checkpointed_as_is=True)
    live, gathered = list(tracker.live), [0] * len(tracker.live)
    events = None
    if gathering is not None and blocks is not None:  # written out at full depth, then replayed (synthesis)
        events = gathering.recorded()
        blocks.sequence = None
    elif gathering is not None:  # the gathered parameters join the live bytes (and the records)
        intervals = gathering.intervals(len(live) - 1)
        gathered = gathered_bytes(intervals, len(live))
        if tracker.record:
            tracker.storages += [(born, freed, nbytes, -key) for born, freed, nbytes, key in intervals]
        live = [a + b for a, b in zip(live, gathered)]
    # which parameters a step reaches is known where its path was read from the batch, not assumed (an expert that
    # balanced routing skipped gets tokens in the run's other steps, and its states with them)
    reached = bool(graded) and not tracker.assumed
    return TraceResult(
        live=tuple(live),
        grads=tuple(tracker.grad_log),
        logits=tuple(tracker.logit_log),
        forward_end=forward_end,
        saved_bytes=saved_bytes,
        grad_bytes=grad_bytes,
        labels=tuple(tracker.labels),
        markers=tuple(blocks.markers) if blocks is not None else (),
        storages=tuple(tracker.finished()) if tracker.record else (),
        gathered=tuple(gathered) if gathering is not None and events is None else (),
        grad_keys=tuple(grad_keys) if record else (),
        depends_on_batch=tuple(f"{op} at {where}: {how}" for op, where, how in tracker.depends),
        released_before_forward=sum(released.values()) / max(1, sum(real_trainable.values())),
        own_checkpoints=tuple(dict.fromkeys(own)),
        grad_order=tuple(grad_order) if blocks is None else (),
        ungraded=tuple(fake_names[id(p)] for p in trainable if id(p) not in graded) if reached else (),
        zero3_events=events,
    )


def trace_device(module: nn.Module, batch: Any) -> torch.device:
    """The device the step is traced on: the accelerator the module (or the batch) is on, else the CPU.

    A module on an accelerator (the monitor's, in a GPU run) is traced with that device's fake kernels and autocast
    rules, so the trace sees what the run sees (e.g. CUDA's SDPA backends and autocast op lists). A CPU or
    meta-device module (a config build) is traced on the CPU, with the same result on every machine.
    """
    for t in (*module.parameters(), *module.buffers(), *tree_flatten(batch)[0]):
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            return t.device
    return torch.device("cpu")


def _fake_like(t: torch.Tensor, dtype: torch.dtype, device: torch.device, mode: Any) -> torch.Tensor:
    """A fake tensor of ``t``'s shape and strides on ``device``, made in ``mode``."""
    with mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)


def _fake_attributes(
    module: nn.Module, mode: Any, tracker: LiveTensorTracker, device: torch.device
) -> "list[tuple[str, torch.Tensor]]":
    """Fakes for the tensors held as plain attributes, with their values when small (the step may inspect them)."""
    out = []
    for name, t in tensor_attributes(module):
        fake = _fake_like(t, t.dtype, device if t.device.type == "meta" else t.device, mode)
        if t.device.type != "meta":
            tracker.shadowed(fake, t.detach().clone() if t.numel() <= SHADOW_LIMIT else t)
        out.append((name, fake))
    return out


def _fake_states(
    module: nn.Module, mode: Any, dtype: "torch.dtype | None", device: torch.device
) -> "tuple[dict[str, torch.Tensor], list]":
    """Fake parameters (tied ones shared) and buffers by name on ``device``, floating ones in the engine's dtype
    (``None``: as held); the trainable fakes."""
    fakes: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    with mode:
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in by_id:
                target = dtype if dtype is not None and p.is_floating_point() else p.dtype
                shape = _compat.full_shape(p)  # ZeRO-3 partitions a parameter's data away, not its shape
                by_id[id(p)] = torch.empty(shape, dtype=target, device=device).requires_grad_(p.requires_grad)
            fakes[name] = by_id[id(p)]
        for name, b in module.named_buffers(remove_duplicate=False):
            target = dtype if (b.is_floating_point() and dtype not in (None, torch.float32)) else b.dtype
            fakes[name] = torch.empty(b.shape, dtype=target, device=device)
    return fakes, [p for p in by_id.values() if p.requires_grad]


def _vocab_size(module: nn.Module) -> "int | None":
    """The output vocabulary (for the logits category): a Hugging Face model's output embedding, else its config."""
    hf = find_hf_model(module)
    if hf is None:
        return None
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    vocab = getattr(getattr(hf, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and head is not None else None
