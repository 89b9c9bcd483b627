"""``method="trace"``: run one training step's forward and backward under fake tensors and account every byte.

Nothing is allocated: parameters, buffers and the batch become
:class:`~torch._subclasses.fake_tensor.FakeTensor` s (shapes, dtypes and storages without data), and a
``TorchDispatchMode`` follows every storage the step creates until it dies (``weakref`` on the untyped
storage), so the result is the exact live-tensor timeline of the real eager step (the same kernels run their
shape functions; SDPA and CPU autocast take their real paths, which the meta device does not). Gradients of
parameters are reported to a post-accumulate hook and dropped, so the timeline says, at every op, how many
bytes of activations/logits/temporaries are live and how many gradient bytes the engine has received so far;
each engine then keeps what it keeps (:mod:`.model_states`).
"""

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from lightning_memopt.predictor.activations import num_checkpointed
from lightning_memopt.predictor.model_spec import _find_hf_model
from lightning_memopt.predictor.precision import Precision


@dataclass(frozen=True)
class TraceResult:
    """What one fake training step (forward + backward) did to memory, parameters excluded.

    Attributes:
        live: bytes of live non-parameter tensors after each op (activations, logits, temporaries, gradients
            in flight before they reach the engine).
        grads: gradient bytes handed to the engine so far, at the same moments (parameter dtype).
        forward_end: index in ``live`` where the forward pass (the loss) ended.
        saved_bytes: bytes saved for backward at the end of forward (de-duplicated by storage).
        logits_bytes: of ``saved_bytes``, those of tensors whose last dimension is the vocabulary.
        grad_bytes: total gradient bytes of one backward.
    """

    live: "tuple[int, ...]"
    grads: "tuple[int, ...]"
    forward_end: int
    saved_bytes: int
    logits_bytes: int
    grad_bytes: int

    def peak(self, grad_keep: float = 0.0, grad_extra: int = 0) -> int:
        """Peak of ``live + grad_keep * grads`` over the step, plus ``grad_extra`` once gradients exist.

        Example:
            >>> TraceResult((5, 9, 4), (0, 0, 8), 1, 5, 0, 8).peak(grad_keep=1.0)
            12
        """
        best = 0
        for live, grads in zip(self.live, self.grads):
            best = max(best, live + int(grad_keep * grads) + (grad_extra if grads else 0))
        return best

    @property
    def forward_peak(self) -> int:
        """Peak live bytes during forward."""
        return max(self.live[: self.forward_end + 1] or (0,))


class _Tracker(TorchDispatchMode):
    def __init__(self, exclude: "set[int]") -> None:
        super().__init__()
        self.exclude = exclude
        self.sizes: dict = {}
        self.refs: dict = {}
        self.cur = 0
        self.grads = 0
        self.live: list = []
        self.grad_log: list = []

    def add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.sizes or key in self.exclude:
            return

        def _gone(_: Any, key: int = key) -> None:
            self.cur -= self.sizes.pop(key, 0)
            self.refs.pop(key, None)

        self.refs[key] = weakref.ref(st, _gone)
        self.sizes[key] = st.nbytes()
        self.cur += st.nbytes()

    def mark(self) -> None:
        self.live.append(self.cur)
        self.grad_log.append(self.grads)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        self.mark()
        return out


def _find_blocks(module: nn.Module) -> "list[nn.Module]":
    blocks: list = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(blocks) and len({type(c) for c in m}) == 1:
            blocks = list(m)
    return blocks


@contextlib.contextmanager
def _checkpointed(module: nn.Module, count: int):
    """Checkpoint the first ``count`` blocks (non-reentrant ``torch.utils.checkpoint``), restored on exit."""
    if count == 0:
        yield
        return
    blocks = _find_blocks(module)
    hf_layers = [b for b in blocks if hasattr(b, "gradient_checkpointing")]
    hf = _find_hf_model(module)
    if hf_layers and hf is not None and hasattr(hf, "gradient_checkpointing_enable"):
        module = hf
        # Hugging Face layers (GradientCheckpointingLayer) checkpoint themselves and switch the KV cache off.
        before = [b.gradient_checkpointing for b in hf_layers]
        was = getattr(module, "is_gradient_checkpointing", False)
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, b in enumerate(hf_layers):
            b.gradient_checkpointing = i < count
        try:
            yield
        finally:
            if not was:
                module.gradient_checkpointing_disable()
            for b, flag in zip(hf_layers, before):
                b.gradient_checkpointing = flag
        return
    # The same wrapper as lightning_memopt's checkpointing transform (non-reentrant, KV cache off in recomputation),
    # so the trace counts what a real checkpointed run keeps.
    from lightning_memopt.transforms.checkpointing import _FLAG, _unwrap, _wrap

    patched = [block for block in blocks[:count] if _FLAG not in block.__dict__]
    for block in patched:
        _wrap(block, reentrant=False)
    try:
        yield
    finally:
        for block in patched:
            _unwrap(block)


@contextlib.contextmanager
def _linear_of_the_run(zero3: bool):
    """Trace with the ``torch.nn.functional.linear`` the run will use.

    DeepSpeed's ZeRO-3 ``zero.Init`` replaces it process-wide with its memory-efficient ``zero3_linear_wrap`` ("This
    will persist unless manually reset", deepspeed/runtime/zero/partition_parameters.py): a ZeRO-3 run computes every
    Linear with ``LinearFunctionForZeroStage3`` (``matmul`` then an in-place bias add in forward, its own
    reshapes and matmuls in backward), other runs with PyTorch's own, whatever ran earlier in the process.
    """
    functional = torch.nn.functional
    partition = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(partition, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    wanted = functional.linear if original is None else original
    if zero3:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        wanted = zero3_linear_wrap
    if functional.linear is wanted:
        yield
        return
    replaced, functional.linear = functional.linear, wanted
    try:
        yield
    finally:
        functional.linear = replaced


@contextlib.contextmanager
def _zero3_module_inputs(module: nn.Module, zero3: bool):
    """As DeepSpeed ZeRO-3's ``_post_backward_module_hook`` does, hand every sub-module its tensor arguments as new
    tensors (a view each): the same tensor passed twice arrives as two objects (``nn.MultiheadAttention`` then
    projects q, k and v separately)."""
    if not zero3:
        yield
        return

    def fresh(_: nn.Module, args: tuple) -> tuple:
        return tuple(a.view_as(a) if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(fresh) for m in module.modules() if m is not module]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _attention(module: nn.Module, attention: "str | None"):
    """Set a Hugging Face model's attention implementation for the trace (plain modules keep theirs)."""
    hf = _find_hf_model(module)
    config = getattr(hf, "config", None)
    if attention is None or config is None or not hasattr(config, "_attn_implementation"):
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = attention
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def _no_packed_sequence_detection():
    """transformers' packed-sequence detection reads position ids; fake tensors would route it to a mask."""
    try:
        import transformers.masking_utils as mu
    except Exception:  # transformers missing or too old: nothing to keep out
        yield
        return
    original = getattr(mu, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = original


def _loss_of(module: nn.Module, batch: Any) -> torch.Tensor:
    step = getattr(module, "training_step", None)
    if callable(step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = step(batch, 0)
    elif isinstance(batch, dict):
        out = module(**batch)
    elif isinstance(batch, (tuple, list)):
        out = module(*batch)
    else:
        out = module(batch)
    if isinstance(out, dict) and "loss" in out:
        out = out["loss"]
    elif not isinstance(out, torch.Tensor) and getattr(out, "loss", None) is not None:
        out = out.loss
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            "Expected the traced step to produce a loss tensor (a tensor, a dict with 'loss' or an output"
            " with"
            f" `.loss`), got {type(out).__name__}. Fix: include labels in `example_batch` or return the loss."
        )
    if out.numel() != 1:
        out = out.float().mean()
    return out


def trace_step(
    module: nn.Module,
    example_batch: Any,
    precision: Precision,
    engine: str = "deepspeed",
    activation_checkpointing: "bool | float | int" = False,
    attention: "str | None" = None,
    zero3: bool = False,
) -> TraceResult:
    """Trace forward + backward of ``module`` on ``example_batch`` with fake tensors.

    The module's parameters are replaced (for the duration of the call, through
    :func:`torch.func.functional_call`) by fake tensors in the dtype the engine trains in: DeepSpeed casts the
    module to fp16/bf16 for 16-bit precisions; plain torch ``*-mixed`` keeps fp32 weights under CPU/CUDA
    autocast. The module itself is not changed and no real memory is allocated for it, so a meta-device module
    works too.

    Args:
        module: the model; a LightningModule is stepped through its ``training_step(batch, 0)``, other modules
            through ``module(**batch)`` / ``module(*batch)`` / ``module(batch)``; the loss is ``out.loss``,
            ``out["loss"]`` or the output itself.
        example_batch: one micro-batch (tensors, or dicts/tuples of tensors); only shapes and dtypes are used.
        precision: the resolved precision.
        engine: ``"deepspeed"`` or ``"torch"``.
        activation_checkpointing: checkpoint all (``True``), a fraction or a number of the blocks.
        attention: set a Hugging Face model's attention implementation for the trace (``None`` keeps it).
        zero3: step as a DeepSpeed ZeRO-3 run does: Linear layers through ``zero3_linear_wrap``, every module's
            tensor inputs as new tensors (``_post_backward_module_hook``), and a parameter whose view is saved for
            backward kept gathered (counted) until that saved view is released.

    Example:
        >>> from torch import nn
        >>> from lightning_memopt.predictor.precision import resolve_precision
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> res = trace_step(net, torch.zeros(4, 8), resolve_precision("32-true"))
        >>> res.grad_bytes == 4 * sum(p.numel() for p in net.parameters())
        True
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    dtype = precision.param_dtype(engine)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    originals = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    with fake_mode:
        fakes: dict = {}
        by_id: dict = {}
        for name, p in originals.items():
            if id(p) not in by_id:
                target = dtype if p.is_floating_point() else p.dtype
                by_id[id(p)] = torch.empty(p.shape, dtype=target, device="cpu").requires_grad_(
                    p.requires_grad
                )
            fakes[name] = by_id[id(p)]
        for name, b in buffers.items():
            target = dtype if (b.is_floating_point() and dtype != torch.float32) else b.dtype
            fakes[name] = torch.empty(b.shape, dtype=target, device="cpu")

    def to_fake(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                with fake_mode:
                    return torch.empty(x.shape, dtype=x.dtype, device="cpu")
            return fake_mode.from_tensor(x)
        return x

    batch = tree_map(to_fake, example_batch)
    exclude = {t.untyped_storage()._cdata for t in fakes.values()}
    tracker = _Tracker(exclude)
    grad_bytes = 0

    def on_grad(p: torch.Tensor) -> None:
        nonlocal grad_bytes
        if p.grad is not None:
            tracker.grads += p.grad.untyped_storage().nbytes()
            grad_bytes += p.grad.untyped_storage().nbytes()
            p.grad = None
        tracker.mark()

    handles = [p.register_post_accumulate_grad_hook(on_grad) for p in by_id.values() if p.requires_grad]
    saved: dict = {}

    param_ids = {id(t) for t in by_id.values()}
    pinned: dict = {}  # parameter storage -> live saved views of it (ZeRO-3 keeps that parameter gathered)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            st = t.untyped_storage()
            if st._cdata not in exclude:
                saved[st._cdata] = (st.nbytes(), t.shape[-1] if t.dim() else 0)
            elif zero3 and id(t) not in param_ids:
                _pin(st._cdata, st.nbytes(), t)
        return t

    def _pin(key: int, nbytes: int, view: torch.Tensor) -> None:
        if key not in pinned:
            pinned[key] = 0
            tracker.cur += nbytes
        pinned[key] += 1

        def _unpin(key: int = key, nbytes: int = nbytes) -> None:
            pinned[key] -= 1
            if not pinned[key]:
                del pinned[key]
                tracker.cur -= nbytes

        weakref.finalize(view, _unpin)

    autocast = (
        torch.autocast("cpu", dtype=precision.compute_dtype)
        if engine == "torch" and precision.mixed
        else contextlib.nullcontext()
    )
    blocks = _find_blocks(module)
    count = num_checkpointed(activation_checkpointing, len(blocks))
    was_training = module.training
    module.train()
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_linear_of_the_run(zero3))
            stack.enter_context(_zero3_module_inputs(module, zero3))
            stack.enter_context(_no_packed_sequence_detection())
            stack.enter_context(_attention(module, attention))
            stack.enter_context(_checkpointed(module, count))
            with _reparametrize_module(module, fakes, tie_weights=True, strict=False), fake_mode, tracker:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                    loss = _loss_of(module, batch)
                forward_end = len(tracker.live) - 1
                saved_bytes = sum(n for n, _ in saved.values())
                logits_bytes = sum(n for n, last in saved.values() if vocab and last == vocab)
                saved.clear()
                # as in Lightning, autocast covers the training step only (``Precision.train_step_context``): backward
                # runs outside it, and a checkpointed block's recomputation enters its own autocast, whose weight-cast
                # cache is dropped when the recomputation ends
                loss.backward()
                del loss
                tracker.mark()
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return TraceResult(
        live=tuple(tracker.live),
        grads=tuple(tracker.grad_log),
        forward_end=forward_end,
        saved_bytes=saved_bytes,
        logits_bytes=logits_bytes,
        grad_bytes=grad_bytes,
    )
