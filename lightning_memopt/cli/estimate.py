"""``lightning-memopt estimate`` (the per-rank breakdown) and ``lightning-memopt plan`` (micro-batch, accumulation).

Examples::

    lightning-memopt estimate llama-3-8b --gpus 8 --zero 3 --micro-batch 2 --seq-len 4096 --gpu-memory 80GiB
    lightning-memopt estimate meta-llama/Llama-3.1-8B --seq-len 4096   # a Hub id (HF_HUB_OFFLINE: from the cache)
    lightning-memopt estimate 8B --engine torch            # model states only: the lecture's 16/32/64/32 GB
    lightning-memopt estimate llama-3-8b --quantization q8_0 --inference
    lightning-memopt estimate llama-3-8b --lora-rank 16 --lora-targets q_proj,v_proj --seq-len 2048
    lightning-memopt plan llama-3-8b --gpu-memory 80GiB --gpus 8 --seq-len 4096 --global-batch-tokens 4M

An option that has no effect with the other options given is an error (``_options.Applies`` rules below).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from lightning_memopt.cli import _cache
from lightning_memopt.cli._options import Applies, check_applicable, fill_defaults
from lightning_memopt.core.units import format_bytes, parse_bytes

__all__ = ["ENGINES", "add_common", "add_parser", "parse_count", "parse_model", "run_estimate", "run_plan"]

#: ``--engine`` choices (``lightning_memopt.predictor.request.ENGINES``; not imported: the predictor loads lazily).
ENGINES = ("deepspeed", "torch", "zero-paper")

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"^\s*([0-9][0-9_,]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_count(text: str, what: str = "count") -> int:
    """Parse ``4M``, ``2.5e6``, ``8B``, ``4,000,000`` (SI suffixes K, M, B/G, T) into a positive int.

    Example:
        >>> parse_count("4M"), parse_count("2.5e6"), parse_count("8B"), parse_count("7.5e9")
        (4000000, 2500000, 8000000000, 7500000000)
    """
    match = _COUNT.match(text)
    if match is None:
        raise ValueError(f"Expected a {what} like 4M, 2.5e6 or 8B, got {text!r}.")
    value = float(match.group(1).replace(",", "").replace("_", "")) * _SUFFIX[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"Expected a positive {what}, got {text!r}.")
    return round(value)


def parse_model(text: str) -> str | int:
    """MODEL: a config.json path (or a directory holding one), a parameter count (``7.5e9``, ``8B``), a preset or
    a Hugging Face Hub id (``meta-llama/Llama-3.1-8B``; presets and Hub ids are resolved by the predictor).

    Example:
        >>> parse_model("8B"), parse_model("llama-3-8b")
        (8000000000, 'llama-3-8b')
    """
    if os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json")):
        return os.path.join(text, "config.json")
    if os.path.exists(text) or text.endswith(".json"):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"Expected MODEL to be an existing config.json, got {text!r} (no such file).")
        return text
    if _COUNT.match(text):
        return parse_count(text, "parameter count")
    return text


def _count_arg(what: str) -> Any:
    def convert(text: str) -> int:
        try:
            return parse_count(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = what
    return convert


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


#: Defaults of the options declared with ``default=None`` (so that "given" can be told from "left alone").
DEFAULTS: dict[str, Any] = {
    "gpus": 1, "precision": "bf16-mixed", "optimizer": "adamw", "attention": "sdpa", "engine": "deepspeed",
    "margin": 0.1, "zero": 0, "micro_batch": 1, "zero_stages": "0,1,2,3", "offload_device": "cpu",
}  # fmt: skip


def add_common(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``estimate``, ``plan`` and ``plot``."""
    parser.add_argument("model", metavar="MODEL",
                        help="preset (`lightning-memopt presets`), Hub id (meta-llama/Llama-3.1-8B), config.json path,"
                             " or parameter count (8B)")  # fmt: skip
    parser.add_argument("--gpus", type=_positive_int, default=None, help="data-parallel ranks (world size; 1)")
    parser.add_argument("--precision", default=None, help="16-mixed, bf16-mixed (default), 32-true, bf16-true")
    parser.add_argument("--optimizer", default=None, help="optimizer name (default: adamw)")
    parser.add_argument("--attention", default=None, help="attention backend: eager, sdpa (default), flash_attention_2")
    parser.add_argument("--liger", action="store_true", help="Liger kernels (RMSNorm, SwiGLU, fused CE)")
    parser.add_argument("--engine", default=None, choices=ENGINES,
                        help="deepspeed (what DeepSpeed allocates; default), torch (plain Lightning: DDP or one"
                             " device), zero-paper (the ZeRO paper's 2 + 2 + K bytes per parameter)")  # fmt: skip
    parser.add_argument("--margin", type=_margin, default=None, help="fraction of the device kept free (0.1)")
    parser.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")


def _is_count(args: argparse.Namespace) -> bool:
    return isinstance(args.model_value, int)


def _shapes(args: argparse.Namespace) -> bool:
    return not _is_count(args)


def _quantized(args: argparse.Namespace) -> bool:
    return args.quantization is not None


def _training(args: argparse.Namespace) -> bool:
    return not args.inference


_COUNT_NEEDS = (
    "with a model that has shapes (a preset, a Hub id or a config.json; a parameter count gives model states only)"
)
#: ``estimate``: which options apply with which others.
ESTIMATE_RULES: tuple[Applies, ...] = (
    Applies("--gpus", "gpus", lambda a: not _quantized(a), "without --quantization (a quantized model is estimated on"
            " one device)"),
    Applies("--zero", "zero", lambda a: not _quantized(a), "without --quantization (a quantized model is estimated on"
            " one device)"),
    Applies("--offload-optimizer", "offload_optimizer", lambda a: not _quantized(a), "without --quantization"),
    Applies("--offload-parameters", "offload_parameters", lambda a: not _quantized(a), "without --quantization"),
    Applies("--engine", "engine", lambda a: not _quantized(a), "without --quantization"),
    Applies("--inference", "inference", _quantized, "with --quantization (the quantized model's inference)"),
    Applies("--lora-rank", "lora_rank", lambda a: _training(a) and _shapes(a),
            f"when training {_COUNT_NEEDS} (LoRA adapters on a frozen base; with --quantization: QLoRA)"),
    Applies("--lora-targets", "lora_targets", lambda a: a.lora_rank is not None and not _quantized(a),
            "with --lora-rank and without --quantization (QLoRA adapts every linear layer)",
            fix="add --lora-rank 16"),
    Applies("--optimizer", "optimizer", _training, "without --inference (nothing is optimized)"),
    Applies("--precision", "precision", _training, "without --inference (the quantized weights set the precision)"),
    Applies("--checkpointing", "checkpointing", lambda a: _training(a) and _shapes(a),
            f"when training {_COUNT_NEEDS}"),
    Applies("--attention", "attention", lambda a: _training(a) and _shapes(a), f"when training {_COUNT_NEEDS}"),
    Applies("--liger", "liger", lambda a: _training(a) and _shapes(a), f"when training {_COUNT_NEEDS}"),
    Applies("--micro-batch", "micro_batch", _shapes, _COUNT_NEEDS),
    Applies("--seq-len", "seq_len", _shapes, _COUNT_NEEDS),
    Applies("--margin", "margin", lambda a: a.gpu_memory is not None, "with --gpu-memory (the margin of the verdict)"),
)
#: ``plan``: which options apply with which others.
PLAN_RULES: tuple[Applies, ...] = (
    Applies("--zero-stages", "zero_stages", lambda a: a.engine != "torch", "without --engine torch (plain Lightning"
            " has no ZeRO)"),
    Applies("--no-offload", "no_offload", lambda a: a.engine != "torch", "without --engine torch (plain Lightning"
            " never offloads)"),
    Applies("--offload-device", "offload_device", lambda a: not a.no_offload and a.engine != "torch",
            "without --no-offload and --engine torch (it is where offloaded states go)"),
    Applies("--attention", "attention", _shapes, _COUNT_NEEDS),
    Applies("--liger", "liger", _shapes, _COUNT_NEEDS),
    Applies("--no-checkpointing", "no_checkpointing", _shapes, _COUNT_NEEDS),
)


def prepare(args: argparse.Namespace, rules: tuple[Applies, ...]) -> argparse.Namespace:
    """Parse MODEL, check that every option given applies, then fill in the defaults; returns ``args``."""
    args.model_value = parse_model(args.model)
    check_applicable(args, rules)
    return fill_defaults(args, DEFAULTS)


def add_parser(subparsers: Any) -> None:
    """Register ``estimate`` and ``plan`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    est = subparsers.add_parser("estimate", help="per-rank memory breakdown of one setting")
    add_common(est)
    est.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (0)")
    est.add_argument("--micro-batch", type=_positive_int, default=None, help="sequences per rank and step (1)")
    est.add_argument("--seq-len", type=_positive_int, default=None,
                     help="tokens per sequence (default: the config's max_position_embeddings)")  # fmt: skip
    est.add_argument("--offload-optimizer", choices=("cpu", "nvme"), default=None)
    est.add_argument("--offload-parameters", choices=("cpu", "nvme"), default=None)
    est.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    est.add_argument("--quantization", default=None, help="q8_0, q6_k, q4_0, q4_k, int8, int4, nf4, nf4-dq")
    est.add_argument("--inference", action="store_true", help="with --quantization: inference, not QLoRA")
    est.add_argument("--lora-rank", type=_positive_int, default=None,
                     help="LoRA adapters of this rank on a frozen base (with --quantization: QLoRA, default 16)")
    est.add_argument("--lora-targets", default=None,
                     help="with --lora-rank: modules that get adapters, e.g. q_proj,v_proj or all-linear"
                          " (default: PEFT's for the architecture)")  # fmt: skip
    est.add_argument("--gpu-memory", type=_bytes_arg, default=None, help="device memory, e.g. 80GiB")
    est.add_argument("--device", default=None,
                     help="the GPU the run trains on (h100, h200, a100, l40s, l4, or cuda): adds CUDA's cuBLAS"
                          " workspaces and caching allocator (reserved), and the CUDA context where"
                          " measured")  # fmt: skip
    est.add_argument("--no-cache", action="store_true", help="answer afresh (see LIGHTNING_MEMOPT_CLI_CACHE)")
    est.set_defaults(handler=run_estimate)

    plan = subparsers.add_parser("plan", help="largest micro-batch, accumulation and cheapest setting that fits")
    add_common(plan)
    plan.add_argument("--gpu-memory", type=_bytes_arg, required=True, help="device memory, e.g. 80GiB")
    plan.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    plan.add_argument("--global-batch-tokens", type=_count_arg("token count"), required=True, help="e.g. 4M")
    plan.add_argument("--zero-stages", default=None, help="ZeRO stages to search, e.g. 2,3 (0,1,2,3)")
    plan.add_argument("--no-checkpointing", action="store_true", help="never turn on checkpointing")
    plan.add_argument("--no-offload", action="store_true", help="never offload")
    plan.add_argument("--offload-device", choices=("cpu", "nvme"), default=None, help="where to offload (cpu)")
    plan.add_argument("--no-cache", action="store_true", help="answer afresh (see LIGHTNING_MEMOPT_CLI_CACHE)")
    plan.set_defaults(handler=run_plan)


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``estimate_memory`` keyword arguments of the common options (after :func:`prepare`)."""
    return {
        "precision": args.precision,
        "optimizer": args.optimizer,
        "attention": args.attention,
        "liger": args.liger,
        "engine": args.engine,
    }


def parse_stages(text: str) -> tuple[int, ...]:
    """``--zero-stages 2,3`` -> ``(2, 3)``."""
    try:
        return tuple(sorted({int(z) for z in text.split(",") if z.strip()}))
    except ValueError:
        raise ValueError(f"Expected --zero-stages like 0,1,2,3, got {text!r}.") from None


def print_json(data: Any) -> None:
    """The machine-readable output of every command: indented JSON, bytes as ints."""
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def _setting(args: argparse.Namespace, details: dict[str, Any]) -> str:
    """One line saying what was estimated (what the defaults filled in included)."""
    model = f"{args.model} ({details.get('num_parameters', 0) / 1e9:.2f}B parameters)"
    if "quantization" in details:
        return f"{model}, {details['quantization']} {details['mode']}, one device"
    tokens = (", model states only (a parameter count has no shapes)" if _is_count(args)
              else f", micro-batch {details['micro_batch_size']} x {details['seq_len']} tokens")  # fmt: skip
    stage = "plain torch" if details["engine"] == "torch" else f"ZeRO-{details['zero']} ({details['engine']})"
    lora = ""
    if details.get("lora_rank"):
        lora = f", LoRA rank {details['lora_rank']} ({details.get('trainable_parameters', 0) / 1e6:.1f}M trainable)"
    return f"{model}, {details['world_size']} GPU(s), {stage}{tokens}, {details['precision']}{lora}"


def cached(answer: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Print the answer of a prepared command from the disk cache (:mod:`._cache`) when it was asked before, else
    answer it and store what it printed; returns the exit code."""
    cache_key = _cache.key(args)
    hit = _cache.lookup(cache_key) if cache_key is not None else None
    if hit is not None:
        sys.stdout.write(hit[0])
        return hit[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = answer(args)
    sys.stdout.write(out.getvalue())
    if cache_key is not None:
        _cache.store(cache_key, out.getvalue(), code)
    return code


def run_estimate(args: argparse.Namespace) -> int:
    """Handler of ``estimate``: print the breakdown (and whether it fits); returns the exit code."""
    return cached(_estimate, prepare(args, ESTIMATE_RULES))


def _estimate(args: argparse.Namespace) -> int:
    model = args.model_value
    lora_rank = args.lora_rank  # not filled in by DEFAULTS: without it, a 16-bit estimate trains every weight
    if args.quantization is not None:
        from lightning_memopt.planning.quantized import estimate_quantized

        estimate = estimate_quantized(
            model, args.quantization, mode="inference" if args.inference else "qlora",
            micro_batch_size=args.micro_batch, seq_len=args.seq_len, precision=args.precision,
            optimizer=args.optimizer, lora_rank=lora_rank or 16, activation_checkpointing=args.checkpointing,
            attention=args.attention, liger=args.liger,
        )  # fmt: skip
    else:
        from lightning_memopt.planning.estimate import estimate_memory

        estimate = estimate_memory(
            model, world_size=args.gpus, zero=args.zero, micro_batch_size=args.micro_batch,
            seq_len=args.seq_len, offload_optimizer=args.offload_optimizer or False,
            offload_parameters=args.offload_parameters or False,
            activation_checkpointing=args.checkpointing, lora_rank=lora_rank, lora_targets=_targets(args),
            device=args.device, **common_kwargs(args),
        )  # fmt: skip
    fits = None if args.gpu_memory is None else estimate.fits(args.gpu_memory, margin=args.margin)
    if args.json:
        data = estimate.to_dict()
        if fits is not None:
            data.update(fits=fits, device_memory=args.gpu_memory, margin=args.margin)
        print_json(data)
        return 0
    print(_setting(args, {**(estimate.details or {}), "num_parameters": _num_parameters(model, estimate)}))
    print(estimate.table())
    if fits is not None:
        budget = int(args.gpu_memory * (1 - args.margin))
        verdict = "fits" if fits else "does NOT fit"
        print(f"\n{verdict} in {format_bytes(args.gpu_memory)} with {args.margin:.0%} kept free"
              f" (budget {format_bytes(budget)}, headroom {format_bytes(budget - estimate.budgeted)})")
    return 0


def _targets(args: argparse.Namespace) -> str | list[str] | None:
    """``--lora-targets q_proj,v_proj`` -> a list; ``all-linear`` stays PEFT's keyword."""
    text = args.lora_targets
    if text is None or text == "all-linear":
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def _num_parameters(model: Any, estimate: Any) -> int:
    details = estimate.details or {}
    if "num_parameters" in details:
        return int(details["num_parameters"])
    from lightning_memopt.predictor.read.sources import resolve_model

    return resolve_model(model).num_parameters


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``plan``: print the plan; returns 1 when nothing fits."""
    return cached(_plan, prepare(args, PLAN_RULES))


def _plan(args: argparse.Namespace) -> int:
    from lightning_memopt.planning.plan import NoFitError, plan_batch

    torch_engine = args.engine == "torch"
    try:
        plan = plan_batch(
            args.model_value, device_memory=args.gpu_memory, world_size=args.gpus, seq_len=args.seq_len,
            global_batch_tokens=args.global_batch_tokens, margin=args.margin,
            zero_stages=(0,) if torch_engine else parse_stages(args.zero_stages),
            checkpointing=not args.no_checkpointing, offload=not (args.no_offload or torch_engine),
            offload_device=args.offload_device, **common_kwargs(args),
        )  # fmt: skip
    except NoFitError as err:
        print(f"lightning-memopt plan: {' '.join(str(err).split())}")
        return 1
    if args.json:
        print_json(plan.to_dict())
    else:
        print(plan.table())
    return 0
