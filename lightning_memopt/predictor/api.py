"""``predict``: the per-rank memory of one training step of a model as it is, before the run."""

from collections.abc import Callable
from typing import Any

from lightning_memopt.core.blocks import checkpoint_flags
from lightning_memopt.core.deepspeed_config import zero_settings
from lightning_memopt.predictor.cuda_memory import CudaRules, cuda_rules, replay_model
from lightning_memopt.predictor.estimate import MemoryEstimate
from lightning_memopt.predictor.model_states import (
    ENGINES,
    EngineMemory,
    Phase,
    engine_memory,
    resolve_optimizer,
)
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.sources import resolve_source
from lightning_memopt.predictor.timeline import Timeline, recorded_trace, step_batch, step_timeline
from lightning_memopt.predictor.zero3 import Zero3Settings

METHODS = ("trace",)
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}. Fix: e.g. {name}=1.")
    return value


def _offload(name: str, value: Any) -> "bool | str":
    if value is True:
        return "cpu"
    if value in (None, False):
        return False
    if isinstance(value, str) and value.lower() in ("cpu", "nvme"):
        return value.lower()
    raise ValueError(f"Expected `{name}` to be False, 'cpu' or 'nvme', got {value!r}. Fix: e.g. {name}='cpu'.")


def _from_config(deepspeed_config: Any, key: str, value: "bool | str") -> "bool | str":
    """An offload device set in the DeepSpeed config is used when the argument is left False; a conflict raises."""
    if not isinstance(deepspeed_config, dict):
        return value
    device = ((deepspeed_config.get("zero_optimization") or {}).get(key) or {}).get("device")
    if device in (None, "none"):
        return value
    if value is False:
        return _offload(key, device)
    if value != device:
        raise ValueError(
            f"Expected the {key} argument ({value!r}) to match deepspeed_config's device ({device!r})."
            " Fix: drop the argument or change the config."
        )
    return value


def _validate(
    zero: Any, engine: str, method: str, attention: Any, offload_opt: Any, offload_par: Any, deepspeed_config: Any
) -> None:
    if isinstance(zero, bool) or not isinstance(zero, int) or not 0 <= zero <= 3:
        raise ValueError(f"Expected `zero` (the ZeRO stage) in 0..3, got {zero!r}. Fix: e.g. zero=3.")
    if engine not in ENGINES:
        raise ValueError(f"Expected `engine` in {ENGINES}, got {engine!r}. Fix: e.g. engine='deepspeed'.")
    if method == "analytic":
        raise ValueError(
            "Expected method='trace', got 'analytic': the closed-form activation formulas were exact for the Llama"
            " family only and were removed; the trace is exact for any model and as fast (a reduced-depth replica"
            " of a large model). Fix: drop `method`."
        )
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, got {method!r}. Fix: drop `method`.")
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(
            f"Expected `attention` in {ATTENTIONS} or None (the model's own), got {attention!r}."
            " Fix: e.g. attention='sdpa'."
        )
    if engine == "torch" and (zero or offload_opt or offload_par):
        raise ValueError(
            f"Expected zero=0 and no offload with engine='torch' (plain Lightning), got zero={zero},"
            f" offload_optimizer={offload_opt!r}, offload_parameters={offload_par!r}. Fix: use engine='deepspeed'."
        )
    if offload_opt and zero == 0:
        raise ValueError(
            "Expected zero >= 1 with `offload_optimizer` (DeepSpeed offloads ZeRO partitions), got zero=0."
            " Fix: zero=1..3."
        )
    if offload_par and zero != 3:
        raise ValueError(
            f"Expected zero=3 with `offload_parameters` (ZeRO-Infinity), got zero={zero}. Fix: zero=3."
        )
    if deepspeed_config is not None:
        if not isinstance(deepspeed_config, dict):
            raise TypeError(
                f"Expected `deepspeed_config` to be a dict, got {type(deepspeed_config).__name__}."
                " Fix: pass the config dict the strategy uses."
            )
        stage = (deepspeed_config.get("zero_optimization") or {}).get("stage")
        if stage is not None and stage != zero:
            raise ValueError(
                f"Expected deepspeed_config's zero_optimization.stage ({stage}) to equal zero={zero}."
                " Fix: pass the same stage."
            )


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

    The model states come from the model's own parameters (frozen ones included, each in its dtype) as the engine
    keeps them (:mod:`.model_states`); the activations from one traced step of the model itself (:mod:`.trace`):
    the real module, or for a config the model transformers builds from it on the meta device, at the requested
    micro-batch and sequence length. The peak is the largest moment of the step: activations and gradients in
    flight at every op of forward and backward with what the engine holds then, the gradient reduction and the
    optimizer step. The six categories are those of the winning moment.

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
        device: the device the run trains on, whose rules apply (:mod:`.cuda_memory`): ``"cpu"``, ``"cuda"`` (a
            compute-capability 9.0 GPU when not told otherwise), a GPU name (``"h100"``, ``"NVIDIA H200"``) or
            :class:`~lightning_memopt.predictor.cuda_memory.CudaRules`; ``None``: the device the module is on (a config
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
    world_size = _positive_int("world_size", world_size)
    accumulate = _positive_int("accumulate_grad_batches", accumulate_grad_batches)
    for name, value in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len)):
        if value is not None:
            _positive_int(name, value)
    offload_opt = _from_config(deepspeed_config, "offload_optimizer", _offload("offload_optimizer", offload_optimizer))
    offload_par = _from_config(deepspeed_config, "offload_param", _offload("offload_parameters", offload_parameters))
    _validate(zero, engine, method, attention, offload_opt, offload_par, deepspeed_config)
    prec = resolve_precision(precision)
    resolve_optimizer(optimizer)
    source = resolve_source(model)
    rules = device if isinstance(device, CudaRules) else cuda_rules(
        device if device is not None else _module_device(source.module), expandable_segments=expandable_segments
    )
    reading = source.reading
    zero3 = _zero3_settings(reading, deepspeed_config, world_size) if engine == "deepspeed" and zero == 3 else False
    act_engine = "deepspeed" if engine == "zero-paper" else engine
    if source.module is None or engine == "zero-paper":
        timeline = Timeline.empty()
        shape = (micro_batch_size or 1, seq_len)
    else:
        timeline, shape = step_timeline(
            source,
            example_batch=example_batch,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            precision=prec,
            engine=act_engine,
            activation_checkpointing=activation_checkpointing,
            attention=attention,
            zero3=zero3,
            cuda=rules is not None,
            autocast_cache=bool(autocast_cache),
        )
    ranks: "list[int | None]" = [None]
    if engine == "deepspeed" and zero in (1, 2) and world_size > 1:
        ranks = (
            list(range(world_size))
            if world_size <= 16
            else sorted({0, 1, world_size // 2, world_size - 2, world_size - 1})
        )
    ems = {
        r: engine_memory(
            reading,
            world_size=world_size,
            zero=zero,
            precision=prec,
            optimizer=optimizer,
            offload_optimizer=offload_opt,
            offload_parameters=offload_par,
            engine=engine,
            deepspeed_config=deepspeed_config,
            rank=r,
            grad_order=timeline.grad_order or None,  # ZeRO-2's buckets fill in the traced arrival order
        )
        for r in ranks
    }
    em = ems[ranks[-1]]
    checkpointed = sum(checkpoint_flags(source.module, activation_checkpointing)) if source.module is not None else 0
    grad_bytes = prec.param_bytes(act_engine)  # DeepSpeed: every trainable parameter in its dtype
    per_rank, best, phases = {}, None, []
    for r, em_r in ems.items():
        phases_r = _phases(em_r, timeline, grad_bytes, accumulate > 1)
        top = max(phases_r, key=lambda p: p[0].total + p[1] + p[2])
        per_rank[r] = top[0].total + top[1] + top[2]
        if best is None or per_rank[r] > best[0].total + best[1] + best[2]:
            best, phases = top, phases_r
    phase, act_bytes, logit_bytes = best
    details: "dict[str, Any]" = {
        "model": reading.name,
        "num_parameters": reading.num_parameters,
        "trainable_parameters": reading.trainable_parameters,
        "world_size": world_size,
        "zero": zero,
        "precision": prec.name,
        "engine": engine,
        "method": method,
        "micro_batch_size": shape[0],
        "seq_len": shape[1],
        "accumulate_grad_batches": accumulate,
        "checkpointed_blocks": checkpointed,
        **timeline.details,
        **em.details,
    }
    if source.module is None:
        details["activations"] = "not estimated: the model is a parameter count (model states only)"
    if engine == "torch" and prec.mixed:
        # the lecture's table (section 1): every item at once, although they never coexist at the peak
        P = reading.num_parameters
        details["lecture_breakdown"] = {
            "half_weights": prec.compute_bytes * P,
            "fp32_parameters": 4 * P,
            "adam_states": resolve_optimizer(optimizer)[0] * P,
            "fp32_gradients": 4 * P,
        }
    if em.nvme_offloaded:
        details["nvme_offloaded"] = em.nvme_offloaded
    if ranks != [None]:
        details["per_rank_total"] = per_rank
    details["peak_phase"] = phase.name
    details["phases"] = {p.name: p.total + a + lg for p, a, lg in phases}
    total = int(phase.total + act_bytes + logit_bytes)

    def replay() -> Any:  # the whole run through CUDA's caching allocator, from one step traced with every storage
        batch, _ = step_batch(source, example_batch, micro_batch_size, seq_len)
        trace = recorded_trace(source, batch, precision=prec, engine=act_engine, zero3=zero3, cuda=True,
                               activation_checkpointing=activation_checkpointing, attention=attention,
                               autocast_cache=bool(autocast_cache))  # fmt: skip
        return replay_model(trace, reading, prec.param_bytes(act_engine), optimizer, rules)

    replayable = engine == "torch" and world_size == 1 and source.module is not None
    cuda = _on_cuda(rules, total, details, replay if replayable else None)
    return MemoryEstimate(
        parameters=int(phase.parameters),
        gradients=int(phase.gradients),
        optimizer_states=int(phase.optimizer_states),
        activations=int(act_bytes),
        logits=int(logit_bytes),
        buffers=int(phase.buffers),
        total=total + cuda["workspaces"] + cuda["allocator_rounding"],
        cpu_offloaded=int(em.cpu_offloaded + (em.details.get("cpu_accumulation_bytes", 0) if accumulate > 1 else 0)),
        details=details,
        **cuda,
    )


def _module_device(module: Any) -> "str | None":
    """The device type a module's parameters are on (``None``: no module, or CPU/meta)."""
    if module is None:
        return None
    first = next(iter(module.parameters()), None)
    return None if first is None or first.device.type in ("cpu", "meta") else first.device.type


def _on_cuda(
    rules: "CudaRules | None", total: int, details: "dict[str, Any]", replay: "Callable[[], Any] | None"
) -> "dict[str, int | None]":
    """What CUDA adds (:mod:`.cuda_memory`): the workspaces, and where the run's allocation sequence is known
    (``replay``: the plain engine on one device) the allocator's blocks, its reserved peak and the device total."""
    out: "dict[str, int | None]" = {"workspaces": 0, "allocator_rounding": 0, "reserved": None, "device_total": None}
    if rules is None:
        return out
    out["workspaces"] = rules.workspaces
    details["cuda"] = {"device": rules.name, "capability": list(rules.capability),
                       "workspace_bytes": rules.workspace_bytes, "expandable_segments": rules.expandable_segments,
                       "context_bytes": rules.context_bytes}  # fmt: skip
    if replay is None:
        details["cuda"]["reserved"] = (
            "not predicted: the caching allocator is replayed for the plain engine on one device (DeepSpeed's and"
            " DDP's buffers are not in the replayed sequence yet)"
        )
        return out
    sim = replay()
    out["allocator_rounding"] = max(0, sim.peak_allocated - total - rules.workspaces)
    out["reserved"] = max(sim.peak_reserved, total + rules.workspaces + out["allocator_rounding"])
    if rules.context_bytes is not None:
        out["device_total"] = out["reserved"] + rules.context_bytes
    details["reserved_bytes"], details["device_bytes"] = out["reserved"], out["device_total"]
    details["cuda"]["segments"] = sim.num_segments
    return out


def _zero3_settings(reading: Any, deepspeed_config: "dict[str, Any] | None", world_size: int) -> Zero3Settings:
    """What DeepSpeed's parameter coordinator decides with (:mod:`.zero3`); on one rank nothing is gathered."""
    cfg = zero_settings(deepspeed_config)
    return Zero3Settings(
        persistence_threshold=int(cfg["stage3_param_persistence_threshold"]),
        max_reuse_distance=int(cfg["stage3_max_reuse_distance"]),
        prefetch_bucket_size=int(cfg["stage3_prefetch_bucket_size"]),
        max_live_parameters=int(cfg["stage3_max_live_parameters"]),
        complete_trace=not reading.step_calls_root,
        partitioned=world_size > 1,
    )


def _phases(
    em: EngineMemory, timeline: Timeline, grad_bytes: int, accumulating: bool = False
) -> "list[tuple[Phase, int, int]]":
    """Every moment as (model-state phase, activation bytes, logits bytes): the step's highest moment of forward
    and backward, then the engine's moments without activations (gradient reduction, optimizer step). ZeRO-3
    parameters gathered at a moment (in the traced timeline) count as parameters.

    ``accumulating``: the moments of a micro-step that follows another one (gradient accumulation), when what the
    engine holds between micro-steps is there from the start and the new gradients are added into it.
    """
    base = em.base
    best = None
    unit = em.grad_unit or grad_bytes
    for live, grads, logits, forward, gathered in timeline.moments():
        g, buf = em.backward_extra(grads // unit)
        if forward:  # the previous step's gradients a step did not free before its forward
            g = max(g, int(em.forward_gradients * timeline.grads_in_forward))
        if accumulating:
            held_g, held_buf = em.accumulating_extra()
            g, buf = max(g, held_g), max(buf, held_buf)
        phase = Phase(
            "backward",
            base.parameters + em.gathered + gathered,
            base.gradients + g,
            base.optimizer_states,
            base.buffers + buf,
        )
        item = (phase, live - logits - gathered, logits)
        if best is None or phase.total + item[1] + logits > best[0].total + best[1] + best[2]:
            best = item
    return [best, *((p, 0, 0) for p in em.phases)]
