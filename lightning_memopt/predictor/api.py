"""``predict``: the per-rank memory of one training step of a model as it is, before the run.

The predictor is a pipeline of four stages, each in its own package, each taking the previous stage's object:

1. **read** (:mod:`.read`): the model argument, whatever it is, read once into a
   :class:`~lightning_memopt.predictor.read.sources.Source` (what the model holds, and the module to trace);
2. **trace** (:mod:`.trace`): one training step traced on fake tensors into a
   :class:`~lightning_memopt.predictor.trace.timeline.Timeline` (live bytes after every op);
3. **account** (:mod:`.account`): the engine (plain torch, DeepSpeed ZeRO 0-3, offload) and the device on that
   timeline, an :class:`~lightning_memopt.predictor.account.accounting.Accounting` of the peak moment;
4. **report** (:mod:`.report`): the :class:`~lightning_memopt.predictor.report.estimate.MemoryEstimate`.

The settings are validated once, before the first stage, into a :class:`~lightning_memopt.predictor.request.Request`
that every stage reads.
"""

from typing import Any

from lightning_memopt.predictor.account.accounting import account
from lightning_memopt.predictor.device import CudaRules
from lightning_memopt.predictor.read.sources import resolve_source
from lightning_memopt.predictor.report.estimate import MemoryEstimate
from lightning_memopt.predictor.report.report import report
from lightning_memopt.predictor.request import make_request
from lightning_memopt.predictor.trace.timeline import step_timeline


def predict(
    model: Any,
    *,
    world_size: int = 1,
    zero: int = 0,
    micro_batch_size: "int | None" = None,
    seq_len: "int | None" = None,
    precision: "str | int" = "bf16-mixed",
    optimizer: str = "adamw",
    offload_optimizer: "bool | str" = False,
    offload_parameters: "bool | str" = False,
    activation_checkpointing: "bool | float | int | None" = None,
    attention: "str | None" = None,
    engine: str = "deepspeed",
    method: str = "trace",
    deepspeed_config: "dict[str, Any] | None" = None,
    example_batch: Any = None,
    accumulate_grad_batches: int = 1,
    device: "str | CudaRules | None" = None,
    expandable_segments: "bool | None" = None,
    autocast_cache: bool = False,
) -> MemoryEstimate:
    """Predict one rank's peak memory of a training step (forward, backward, optimizer step) of ``model`` as it is.

    The model is traced as given: kernels, adapters and checkpointing applied to it are what runs. To ask what a
    transform would do (Liger kernels, LoRA adapters on a config), use
    :func:`lightning_memopt.planning.estimate_memory`, which applies it to a model built from the config first.

    The model states come from the model's own parameters (frozen ones included, each in its dtype) as the engine keeps
    them (:mod:`.account.model_states`); the activations from one traced step of the model itself (:mod:`.trace.step`):
    the real module, or for a config the model transformers builds from it on the meta device, at the requested
    micro-batch and sequence length. The peak is the largest moment of the step: activations and gradients in flight at
    every op of forward and backward with what the engine holds then, the gradient reduction and the optimizer step. The
    six categories are those of the winning moment.

    With gradient accumulation (``accumulate_grad_batches > 1``) every micro-step after the first runs its forward
    and backward while the engine still holds the previous micro-steps' gradients.

    Args:
        model: an ``nn.Module`` (LightningModule, Hugging Face or any PyTorch model), a Hugging Face config (object,
            dict, ``config.json`` path or directory), a preset name, or a parameter count (``8e9``, ``"8B"``: model
            states only, activations 0).
        world_size: data-parallel ranks.
        zero: ZeRO stage 0-3 (``engine="deepspeed"``/``"zero-paper"``).
        micro_batch_size: samples per forward/backward (default 1; with ``example_batch``: its size).
        seq_len: tokens per sample (default: the config's ``max_position_embeddings``; with ``example_batch``: its).
        precision: Lightning precision name.
        optimizer: ``adamw``/``adam`` (torch single-tensor path, the CPU default), ``*-foreach`` (CUDA default),
            ``*-fused``, ``sgd``, ``sgd-momentum``.
        offload_optimizer: False, ``"cpu"`` or ``"nvme"`` (ZeRO-Offload / ZeRO-Infinity).
        offload_parameters: False, ``"cpu"`` or ``"nvme"`` (ZeRO-3 only).
        activation_checkpointing: ``None``: the blocks checkpointed as the model has them; ``True``/``False``, a
            fraction of blocks in (0, 1] or a number of blocks: exactly the first blocks it says.
        attention: a Hugging Face attention implementation (``sdpa``, ``eager``, ``flash_attention_2``,
            ``flex_attention``) or ``None`` to keep the model's.
        engine: ``"deepspeed"`` (what DeepSpeed 0.19.8 allocates), ``"torch"`` (plain Lightning: single device
            or DDP) or ``"zero-paper"`` (the ZeRO paper's 2 + 2 + K accounting, Figure 1, model states only).
        method: ``"trace"`` (the only method; ``"analytic"`` was removed, see the error it raises).
        deepspeed_config: the DeepSpeed config the strategy uses (bucket sizes, thresholds).
        example_batch: one micro-batch of the real inputs (required for a model that is not a Hugging Face one).
        accumulate_grad_batches: micro-steps per optimizer step (Lightning's ``accumulate_grad_batches``).
        device: the device the run trains on, whose rules apply (:mod:`.device`): ``"cpu"``, ``"cuda"`` (a
            compute-capability 9.0 GPU when not told otherwise), a GPU name (``"h100"``, ``"NVIDIA H200"``) or
            :class:`~lightning_memopt.predictor.device.CudaRules`; ``None``: the device the module is on (a config
            or preset: the CPU). On CUDA, ``total`` is what ``max_memory_allocated`` reports (the cuBLAS workspaces
            and the allocator's blocks included) and ``reserved`` / ``device_total`` what ``max_memory_reserved`` and
            ``mem_get_info`` report (the plain engine on one device; else ``None``, with the reason in ``details``).
        expandable_segments: the CUDA allocator's mode (``None``: as ``PYTORCH_CUDA_ALLOC_CONF`` says).
        autocast_cache: ``engine="torch"`` with a ``*-mixed`` precision run in a loop of one's own under plain
            ``torch.autocast(...)`` (or Lightning Fabric's), whose weight-cast cache keeps every weight's 16-bit copy
            until the forward's autocast exits; ``False``: as Lightning's precision plugin runs it, without the cache.

    Raises:
        ValueError / TypeError: for any invalid argument, a model that does not train (no loss, no trainable
            parameter) or a config transformers cannot build, with the fix.

    Example:
        >>> est = predict("7.5e9", world_size=64, zero=1, precision="16-mixed", engine="zero-paper")
        >>> round(est.model_states / 1e9, 1)
        31.4
        >>> est = predict("llama-3-8b", world_size=8, zero=3, micro_batch_size=1, seq_len=4096)
        >>> est.fits("80GiB", margin=0.1)
        True
    """
    settings = {name: value for name, value in locals().items() if name != "model"}  # predict's arguments, no other
    request = make_request(**settings)  # validated once, read by every stage
    source = resolve_source(model)  # 1. read
    request = request.on(source.device)  # the target device: as asked, else where the module is
    timeline = step_timeline(source, request)  # 2. trace
    accounting = account(source.reading, timeline, request)  # 3. account
    return report(request, source.reading, timeline, accounting)  # 4. report
