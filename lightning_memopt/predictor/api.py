"""``estimate_memory``: the per-rank memory of one training step, before the run."""

from dataclasses import replace
from typing import Any

from lightning_memopt._imports import _DEEPSPEED_AVAILABLE
from lightning_memopt.predictor.activations import (
    ATTENTIONS,
    Activations,
    activation_bytes,
    describe,
    num_checkpointed,
)
from lightning_memopt.predictor.estimate import MemoryEstimate
from lightning_memopt.predictor.model_spec import ModelSpec, resolve_model
from lightning_memopt.predictor.model_states import (
    ENGINES,
    EngineMemory,
    Phase,
    engine_memory,
    resolve_optimizer,
)
from lightning_memopt.predictor.precision import Precision, resolve_precision

METHODS = ("analytic", "trace")
_OFFLOAD = (False, "cpu", "nvme")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
    return value


def _offload(name: str, value: Any) -> "bool | str":
    if value is True:
        return "cpu"
    if value in (None, False):
        return False
    if isinstance(value, str) and value.lower() in ("cpu", "nvme"):
        return value.lower()
    raise ValueError(f"Expected `{name}` to be False, 'cpu' or 'nvme', got {value!r}.")


def _from_config(deepspeed_config: Any, key: str, value: "bool | str") -> "bool | str":
    """An offload device set in the DeepSpeed config is used when the argument is left False; a conflict
    raises.
    """
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
        )
    return value


def _validate(
    zero: Any,
    engine: str,
    method: str,
    attention: str,
    offload_opt: Any,
    offload_par: Any,
    deepspeed_config: Any,
) -> None:
    if isinstance(zero, bool) or not isinstance(zero, int) or not 0 <= zero <= 3:
        raise ValueError(f"Expected `zero` (the ZeRO stage) in 0..3, got {zero!r}.")
    if engine not in ENGINES:
        raise ValueError(f"Expected `engine` in {ENGINES}, got {engine!r}.")
    if method not in METHODS:
        raise ValueError(f"Expected `method` in {METHODS}, got {method!r}.")
    if attention not in ATTENTIONS:
        raise ValueError(
            f"Expected `attention` in {ATTENTIONS}, got {attention!r}. Fix: e.g. attention='sdpa'."
        )
    if engine == "torch" and (zero or offload_opt or offload_par):
        raise ValueError(
            f"Expected zero=0 and no offload with engine='torch' (plain Lightning), got zero={zero},"
            f" offload_optimizer={offload_opt!r}, offload_parameters={offload_par!r}."
            " Fix: use engine='deepspeed'."
        )
    if offload_opt and zero == 0:
        raise ValueError(
            "Expected zero >= 1 with `offload_optimizer` (DeepSpeed offloads ZeRO partitions)."
            " Fix: zero=1..3."
        )
    if offload_par and zero != 3:
        raise ValueError(f"Expected zero=3 with `offload_parameters` (ZeRO-Infinity), got zero={zero}.")
    if deepspeed_config is not None:
        if not isinstance(deepspeed_config, dict):
            raise TypeError(
                f"Expected `deepspeed_config` to be a dict, got {type(deepspeed_config).__name__}."
            )
        stage = (deepspeed_config.get("zero_optimization") or {}).get("stage")
        if stage is not None and stage != zero:
            raise ValueError(
                f"Expected deepspeed_config's zero_optimization.stage ({stage}) to equal zero={zero}."
            )


def estimate_memory(
    model: Any,
    *,
    world_size: int = 1,
    zero: int = 0,
    micro_batch_size: int = 1,
    seq_len: "int | None" = None,
    precision: "str | int" = "bf16-mixed",
    optimizer: str = "adamw",
    offload_optimizer: "bool | str" = False,
    offload_parameters: "bool | str" = False,
    activation_checkpointing: "bool | float | int" = False,
    attention: str = "sdpa",
    liger: "bool | dict[str, bool]" = False,
    engine: str = "deepspeed",
    method: str = "analytic",
    deepspeed_config: "dict[str, Any] | None" = None,
    example_batch: Any = None,
    accumulate_grad_batches: int = 1,
) -> MemoryEstimate:
    """Predict one rank's peak memory of a training step (forward, backward, optimizer step).

    The peak is the largest of the step's moments: the start of backward (model states + gathered ZeRO-3
    parameters + all saved activations + the loss' gradients), each block's backward (fewer activations, more
    gradients), the gradient reduction at the end of backward (ZeRO 0/1) and the optimizer step (fp32
    gradients and the optimizer's temporaries). The six categories are those of the winning moment.

    With gradient accumulation (``accumulate_grad_batches > 1``) every micro-step after the first runs its forward
    and backward while the engine still holds the previous micro-steps' gradients: all of ``param.grad`` for
    plain torch and ZeRO-0/1 (which reduce only at the accumulation boundary) plus ZeRO-1's reduction bucket,
    ZeRO-2's gradient partition and buckets; ZeRO-3's gradient partition is held anyway.

    Args:
        model: preset name, Hugging Face config (object, dict, ``config.json`` path), ``nn.Module`` or
            parameter count (``8e9``, ``"8B"``: model states only, activations 0).
        world_size: data-parallel ranks.
        zero: ZeRO stage 0-3 (``engine="deepspeed"``/``"zero-paper"``).
        micro_batch_size: samples per forward/backward.
        seq_len: tokens per sample (default: the config's ``max_position_embeddings``).
        precision: Lightning precision name.
        optimizer: ``adamw``/``adam`` (torch single-tensor path, the CPU default), ``*-foreach`` (CUDA
            default), ``*-fused``, ``sgd``, ``sgd-momentum``.
        offload_optimizer: False, ``"cpu"`` or ``"nvme"`` (ZeRO-Offload / ZeRO-Infinity).
        offload_parameters: False, ``"cpu"`` or ``"nvme"`` (ZeRO-3 only).
        activation_checkpointing: bool, a fraction of blocks in (0, 1], or a number of blocks.
        attention: ``sdpa``, ``eager``, ``flash_attention_2`` or ``flex_attention``.
        liger: bool or a dict of Liger kernel switches (rms_norm, rope, swiglu, cross_entropy,
            fused_linear_cross_entropy).
        engine: ``"deepspeed"`` (what DeepSpeed 0.19.8 allocates), ``"torch"`` (plain Lightning: single device
            or DDP) or ``"zero-paper"`` (the ZeRO paper's 2 + 2 + K accounting, Figure 1).
        method: ``"analytic"`` or ``"trace"`` (fake-tensor step of ``model``, an ``nn.Module``, on
            ``example_batch``).
        deepspeed_config: the DeepSpeed config the strategy uses (bucket sizes, thresholds).
        example_batch: one micro-batch for ``method="trace"``.
        accumulate_grad_batches: micro-steps per optimizer step (Lightning's ``accumulate_grad_batches``).

    Raises:
        ValueError / TypeError: for any invalid argument, with the fix.

    Example:
        >>> est = estimate_memory("7.5e9", world_size=64, zero=1, precision="16-mixed", engine="zero-paper")
        >>> round(est.model_states / 1e9, 1)
        31.4
        >>> est = estimate_memory("llama-3-8b", world_size=8, zero=3, micro_batch_size=1, seq_len=4096)
        >>> est.fits("80GiB", margin=0.1)
        True
    """
    world_size = _positive_int("world_size", world_size)
    micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
    accumulate = _positive_int("accumulate_grad_batches", accumulate_grad_batches)
    if seq_len is not None:
        seq_len = _positive_int("seq_len", seq_len)
    offload_opt = _offload("offload_optimizer", offload_optimizer)
    offload_par = _offload("offload_parameters", offload_parameters)
    offload_opt = _from_config(deepspeed_config, "offload_optimizer", offload_opt)
    offload_par = _from_config(deepspeed_config, "offload_param", offload_par)
    _validate(zero, engine, method, attention, offload_opt, offload_par, deepspeed_config)
    prec = resolve_precision(precision)
    resolve_optimizer(optimizer)
    spec = resolve_model(model)
    if method == "trace" and example_batch is None:
        raise ValueError(
            "Expected `example_batch` with method='trace'. Fix: pass one micro-batch of the real inputs."
        )
    if method == "trace" and not _is_module(model):
        raise TypeError(f"Expected an nn.Module with method='trace', got {type(model).__name__}.")
    if seq_len is None:
        seq_len = spec.max_position_embeddings or 2048
    ranks = [None]
    if engine == "deepspeed" and zero in (1, 2) and world_size > 1:
        ranks = (
            list(range(world_size))
            if world_size <= 16
            else sorted({0, 1, world_size // 2, world_size - 2, world_size - 1})
        )
    ems = {
        r: engine_memory(
            spec,
            world_size=world_size,
            zero=zero,
            precision=prec,
            optimizer=optimizer,
            offload_optimizer=offload_opt,
            offload_parameters=offload_par,
            engine=engine,
            deepspeed_config=deepspeed_config,
            rank=r,
        )
        for r in ranks
    }
    zero3_run = engine == "deepspeed" and zero == 3
    # nn.MultiheadAttention's packed input projections stay gathered from their forward to their backward: their
    # views are saved by DeepSpeed's Linear (ModelSpec.packed_projection_params); a trace sees those views itself
    pinned = prec.param_bytes(engine) * spec.packed_projection_params if zero3_run else 0
    if pinned and method == "analytic":
        ems = {r: replace(e, gathered=e.gathered + pinned) for r, e in ems.items()}
    em = ems[ranks[-1]]
    details: "dict[str, Any]" = {
        "model": spec.name,
        "num_parameters": spec.num_parameters,
        "world_size": world_size,
        "zero": zero,
        "precision": prec.name,
        "engine": engine,
        "method": method,
        "seq_len": seq_len,
        "micro_batch_size": micro_batch_size,
        "accumulate_grad_batches": accumulate,
        **em.details,
    }
    if em.nvme_offloaded:
        details["nvme_offloaded"] = em.nvme_offloaded
    if pinned:
        details["pinned_projection_bytes"] = pinned
    if engine == "torch" and prec.mixed:
        # the lecture's table (section 1): every item at once, although they never coexist at the peak
        P = spec.num_parameters
        details["lecture_breakdown"] = {
            "half_weights": prec.compute_bytes * P,
            "fp32_parameters": 4 * P,
            "adam_states": resolve_optimizer(optimizer)[0] * P,
            "fp32_gradients": 4 * P,
        }
    act_engine = "deepspeed" if engine == "zero-paper" else engine
    checkpointed = (
        num_checkpointed(activation_checkpointing, spec.num_layers) if spec.has_structure else 0
    )
    half_copies = _half_copies(spec, prec, act_engine, checkpointed)
    if method == "trace":
        from lightning_memopt.predictor.trace import trace_step

        res = trace_step(
            model,
            example_batch,
            prec,
            engine=act_engine,
            activation_checkpointing=activation_checkpointing,
            attention=attention,
            zero3=zero3_run and bool(_DEEPSPEED_AVAILABLE),
        )
        b = prec.param_bytes(act_engine)
        timeline = [
            (live, g // b, live if g == 0 and i <= res.forward_end + 50 else 0, i <= res.forward_end)
            for i, (live, g) in enumerate(zip(res.live, res.grads))
        ]
        logits_cap = 3 * res.logits_bytes
        timeline = [(live, g, min(live, logits_cap) if g == 0 else 0, fwd) for live, g, _, fwd in timeline]
        half_copies = (0, 0)  # autocast's copies are live tensors of the trace
        details.update(saved_bytes=res.saved_bytes, logits_bytes=res.logits_bytes)
    elif spec.has_structure:
        act = activation_bytes(
            spec,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            compute_bytes=prec.compute_bytes,
            attention=attention,
            activation_checkpointing=activation_checkpointing,
            liger=liger,
            autocast=act_engine == "torch" and prec.mixed,
            zero3=zero3_run,
        )
        copy_bytes = prec.compute_bytes if half_copies[0] else 0
        timeline = _analytic_timeline(spec, act, prec.param_bytes(act_engine), copy_bytes)
        details.update(describe(act))
    else:
        timeline = [(0, 0, 0, False)]
        details["activations"] = "not estimated: the model is a parameter count (model states only)"
    per_rank = {}
    best = None
    for r, em_r in ems.items():
        phases_r = _phases(em_r, timeline, half_copies, accumulate > 1, checkpointed > 0)
        top = max(phases_r, key=lambda p: p[0].total + p[1] + p[2])
        per_rank[r] = top[0].total + top[1] + top[2]
        if best is None or per_rank[r] > best[0][0].total + best[0][1] + best[0][2]:
            best, phases = (top, phases_r), phases_r
    phase, act_bytes, logit_bytes = best[0]
    if ranks != [None]:
        details["per_rank_total"] = per_rank
    details["peak_phase"] = phase.name
    details["phases"] = {p.name: p.total + a + lg for p, a, lg in phases}
    return MemoryEstimate(
        parameters=int(phase.parameters),
        gradients=int(phase.gradients),
        optimizer_states=int(phase.optimizer_states),
        activations=int(act_bytes),
        logits=int(logit_bytes),
        buffers=int(phase.buffers),
        total=int(phase.total + act_bytes + logit_bytes),
        cpu_offloaded=int(em.cpu_offloaded + (em.details.get("cpu_accumulation_bytes", 0) if accumulate > 1 else 0)),
        details=details,
    )


def _is_module(model: Any) -> bool:
    from torch import nn

    return isinstance(model, nn.Module)


def _half_copies(spec: ModelSpec, prec: Precision, engine: str, checkpointed: int = 0) -> "tuple[int, int]":
    """Autocast's half-precision copies of the matmul weights (plain torch ``*-mixed``): (in forward, in backward).

    Autocast caches every weight cast until the training step's autocast region ends, so all copies are live as the
    loss is computed. In backward the copies a checkpointed block made are gone (they were not saved): only the
    block being recomputed holds its own, so of the ``checkpointed`` first blocks one block's copies are counted.
    """
    if engine != "torch" or not prec.mixed:
        return 0, 0
    if not spec.module_params:
        return (prec.compute_bytes * spec.num_parameters,) * 2
    total = 0
    per_block = [0] * spec.num_layers
    for name, numels in spec.module_params:
        if not _autocast_casts(name, spec):
            continue
        total += sum(numels)
        idx = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if idx is not None and idx < spec.num_layers:
            per_block[idx] += sum(numels)
    in_backward = total
    if checkpointed:
        ckpt = per_block[:checkpointed]
        in_backward -= sum(ckpt) - max(ckpt)
    return prec.compute_bytes * total, prec.compute_bytes * in_backward


#: leaf modules of a block whose gradients appear only after its attention's backward
_BEFORE_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "input_layernorm", "ln_1"})


def _autocast_casts(name: str, spec: ModelSpec) -> bool:
    """Whether autocast makes a half-precision copy of module ``name``'s weights: the matmuls' (not the norms'; the
    embedding's only when it is tied to the output projection)."""
    low = name.lower()
    if "norm" in low or low.split(".")[-1].startswith("ln"):
        return False
    return spec.tied_embeddings or not any(key in low for key in ("embed", "wte", "wpe"))


def _after_attention_of(name: str, block: int) -> bool:
    """Whether module ``name`` runs after block ``block``'s attention scores (later blocks and the head included)."""
    parts = name.split(".")
    idx = next((int(p) for p in parts if p.isdigit()), None)
    if idx is None:
        return True  # the final norm and the output projection
    return idx > block or (idx == block and parts[-1] not in _BEFORE_ATTENTION)


def _analytic_timeline(
    spec: ModelSpec, act: Activations, grad_bytes: int, copy_bytes: int = 0
) -> "list[tuple[int, int, int, bool, int]]":
    """(activation bytes, gradient elements produced, of which logits bytes, in forward, ZeRO-3 modules gathered)
    through the step.

    With tied embeddings the output projection's weight gradient waits in autograd's input buffer until the
    embedding's backward adds its part (one AccumulateGrad per leaf), so it is live through the blocks'
    backward.

    ``copy_bytes``: bytes per element of autocast's weight copies (0 without autocast); a moment inside forward
    comes before the casts of the weights that run later, which :func:`_half_copies` counts as made.
    """
    tied = grad_bytes * spec.vocab_size * spec.hidden_size if spec.tied_embeddings else 0
    modules = spec.module_params
    per_layer = [0] * spec.num_layers
    first = [
        0
    ] * spec.num_layers  # the first gradient a block's backward produces (its MLP output projection)
    before_attention = [0] * spec.num_layers  # the input norm and the q/k/v projections (fused or not)
    head = 0
    for name, numels in modules:
        parts = name.split(".")
        idx = next((int(p) for p in parts if p.isdigit()), None)
        if idx is not None and idx < spec.num_layers:
            per_layer[idx] += sum(numels)
            first[idx] = max(first[idx], max(numels, default=0))
            if parts[-1] in _BEFORE_ATTENTION:
                before_attention[idx] += sum(numels)
        elif not any(key in name for key in ("embed", "wte", "wpe")):
            head += sum(numels)
    out = []
    for live, block, where in act.backward_timeline():
        if block < 0:
            out.append((live, 0, act.logits + act.logits_backward, False, 0))
        elif block >= spec.num_layers:  # the final norm's backward: the output projection's gradients exist
            out.append((live + tied, head, 0, False, 0))
        else:
            own = {"attention": per_layer[block] - before_attention[block], "mlp": first[block]}.get(where, 0)
            # ZeRO-3 parameters gathered then: the output projection's (and, while its block is recomputed, the
            # recomputed module's); none between two Linear backwards
            gathering = (2 if block < act.checkpointed else 1) if where == "projection" else 0
            out.append((live + tied, head + sum(per_layer[block + 1 :]) + own, 0, False, gathering))
    end_of_forward = act.saved - act.logits + act.logits_forward + act.forward_extra
    out.append((end_of_forward, 0, act.logits_forward, True, 0))  # the loss, at the end of forward
    if act.forward_attention:  # inside the last checkpointed block's attention
        block = act.checkpointed - 1
        later = sum(
            sum(numels) for name, numels in modules if _autocast_casts(name, spec) and _after_attention_of(name, block)
        )
        out.append((act.forward_attention - copy_bytes * later, 0, 0, True, 0))
    return out


def _phases(
    em: EngineMemory,
    timeline: "list[tuple]",
    half: "tuple[int, int]",
    accumulating: bool = False,
    recompute: bool = False,
) -> "list[tuple[Phase, int, int]]":
    """Every moment as (model-state phase, activation bytes, logits bytes).

    ``timeline``: (activation bytes, gradient elements, of which logits bytes, in forward[, ZeRO-3 modules gathered
    for backward]) per moment; without the last item a backward moment counts one module's ``em.backward_gathered``
    (two with ``recompute``: activation checkpointing re-runs a block's forward inside the backward of its last
    module, whose parameters stay gathered while each recomputed module gathers its own).

    ``half``: autocast's weight copies in forward and in backward (:func:`_half_copies`).

    ``accumulating``: the moments of a micro-step that follows another one (gradient accumulation), when what the
    engine holds between micro-steps is there from the start and the new gradients are added into it.
    """
    base = em.base
    out = []
    best = None
    default = 2 if recompute else 1
    for live, grads, logits, forward, *modules in timeline:
        in_backward = em.backward_gathered * (modules[0] if modules else default)
        g, buf = em.backward_extra(grads)
        if forward:
            g = max(g, em.forward_gradients)
        if accumulating:
            held_g, held_buf = em.accumulating_extra()
            g, buf = max(g, held_g), max(buf, held_buf)
        phase = Phase(
            "backward",
            base.parameters + em.gathered + half[0 if forward else 1] + (0 if forward or not grads else in_backward),
            base.gradients + g,
            base.optimizer_states,
            base.buffers + buf,
        )
        item = (phase, live - logits, logits)
        if best is None or phase.total + live > best[0].total + best[1] + best[2]:
            best = item
    out.append(best)
    out.extend((p, 0, 0) for p in em.phases)
    return out
