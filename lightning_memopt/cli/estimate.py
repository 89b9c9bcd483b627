"""``lightning-memopt estimate`` (the per-rank breakdown) and ``lightning-memopt plan`` (micro-batch, accumulation).

Examples::

    lightning-memopt estimate llama-3-8b --gpus 8 --zero 3 --micro-batch 2 --seq-len 4096 --gpu-memory 80GiB
    lightning-memopt estimate 8B --engine torch            # model states only: the lecture's 16/32/64/32 GB
    lightning-memopt estimate llama-3-8b --quantization q8_0 --inference
    lightning-memopt plan llama-3-8b --gpu-memory 80GiB --gpus 8 --seq-len 4096 --global-batch-tokens 4M
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from lightning_memopt.utilities.units import format_bytes, parse_bytes

__all__ = ["add_parser", "parse_count", "parse_model", "run_estimate", "run_plan"]

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
    return int(round(value))


def parse_model(text: str) -> "str | int":
    """MODEL: a config.json path (or a directory holding one), a parameter count (``7.5e9``, ``8B``), or a preset.

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


def _add_common(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``estimate`` and ``plan``."""
    parser.add_argument("model", metavar="MODEL", help="preset name, config.json path, or parameter count (8B)")
    parser.add_argument("--gpus", type=_positive_int, default=1, help="data-parallel ranks (world size)")
    parser.add_argument("--precision", default="bf16-mixed", help="16-mixed, bf16-mixed, 32-true, bf16-true")
    parser.add_argument("--optimizer", default="adamw", help="optimizer name (default: adamw)")
    parser.add_argument("--attention", default="sdpa", help="attention backend: eager, sdpa, flash_attention_2")
    parser.add_argument("--liger", action="store_true", help="Liger kernels (RMSNorm, SwiGLU, fused CE)")
    parser.add_argument("--engine", default="deepspeed", choices=("deepspeed", "torch"))
    parser.add_argument("--margin", type=_margin, default=0.1, help="fraction of the device kept free (0.1)")
    parser.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")


def add_parser(subparsers: Any) -> None:
    """Register ``estimate`` and ``plan`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    est = subparsers.add_parser("estimate", help="per-rank memory breakdown of one setting")
    _add_common(est)
    est.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    est.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per rank and step")
    est.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence")
    est.add_argument("--offload-optimizer", choices=("cpu", "nvme"), default=None)
    est.add_argument("--offload-parameters", choices=("cpu", "nvme"), default=None)
    est.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    est.add_argument("--quantization", default=None, help="q8_0, q6_k, q4_0, q4_k, int8, int4, nf4, nf4-dq")
    est.add_argument("--inference", action="store_true", help="with --quantization: inference, not QLoRA")
    est.add_argument("--lora-rank", type=_positive_int, default=16, help="with --quantization: LoRA rank")
    est.add_argument("--gpu-memory", type=_bytes_arg, default=None, help="device memory, e.g. 80GiB")
    est.set_defaults(handler=run_estimate)

    plan = subparsers.add_parser("plan", help="largest micro-batch, accumulation and cheapest setting that fits")
    _add_common(plan)
    plan.add_argument("--gpu-memory", type=_bytes_arg, required=True, help="device memory, e.g. 80GiB")
    plan.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    plan.add_argument("--global-batch-tokens", type=_count_arg("token count"), required=True, help="e.g. 4M")
    plan.add_argument("--zero-stages", default="0,1,2,3", help="ZeRO stages to search, e.g. 2,3")
    plan.add_argument("--no-checkpointing", action="store_true", help="never turn on checkpointing")
    plan.add_argument("--no-offload", action="store_true", help="never offload")
    plan.add_argument("--offload-device", choices=("cpu", "nvme"), default="cpu")
    plan.set_defaults(handler=run_plan)


def _common_kwargs(args: argparse.Namespace) -> "dict[str, Any]":
    return {
        "precision": args.precision,
        "optimizer": args.optimizer,
        "attention": args.attention,
        "liger": args.liger,
        "engine": args.engine,
    }


def _print(data: "dict[str, Any]") -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def run_estimate(args: argparse.Namespace) -> int:
    """Handler of ``estimate``: print the breakdown (and whether it fits); returns the exit code."""
    model = parse_model(args.model)
    if args.quantization is not None:
        from lightning_memopt.predictor.quantization import estimate_quantized

        if args.zero or args.offload_optimizer or args.offload_parameters:
            raise ValueError(
                "Expected no --zero / --offload-* with --quantization (a frozen quantized base is estimated"
                " per device, as with DDP), got them. Fix: drop them."
            )
        estimate = estimate_quantized(
            model, args.quantization, mode="inference" if args.inference else "qlora",
            micro_batch_size=args.micro_batch, seq_len=args.seq_len, precision=args.precision,
            optimizer=args.optimizer, lora_rank=args.lora_rank, activation_checkpointing=args.checkpointing,
            attention=args.attention, liger=args.liger,
        )
    else:
        if args.inference:
            raise ValueError("Expected --inference only with --quantization, got it alone.")
        from lightning_memopt.planning.estimate import estimate_memory

        estimate = estimate_memory(
            model, world_size=args.gpus, zero=args.zero, micro_batch_size=args.micro_batch,
            seq_len=args.seq_len, offload_optimizer=args.offload_optimizer or False,
            offload_parameters=args.offload_parameters or False,
            activation_checkpointing=args.checkpointing, **_common_kwargs(args),
        )
    fits = None if args.gpu_memory is None else estimate.fits(args.gpu_memory, margin=args.margin)
    if args.json:
        data = estimate.to_dict()
        if fits is not None:
            data.update(fits=fits, device_memory=args.gpu_memory, margin=args.margin)
        _print(data)
        return 0
    print(estimate.table())
    if fits is not None:
        budget = int(args.gpu_memory * (1 - args.margin))
        verdict = "fits" if fits else "does NOT fit"
        print(f"\n{verdict} in {format_bytes(args.gpu_memory)} with {args.margin:.0%} kept free"
              f" (budget {format_bytes(budget)}, headroom {format_bytes(budget - estimate.total)})")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``plan``: print the plan; returns 1 when nothing fits."""
    from lightning_memopt.planning.plan import NoFitError, plan_batch

    try:
        stages = tuple(sorted({int(z) for z in args.zero_stages.split(",") if z.strip()}))
    except ValueError:
        raise ValueError(f"Expected --zero-stages like 0,1,2,3, got {args.zero_stages!r}.") from None
    try:
        plan = plan_batch(
            parse_model(args.model), device_memory=args.gpu_memory, world_size=args.gpus, seq_len=args.seq_len,
            global_batch_tokens=args.global_batch_tokens, margin=args.margin, zero_stages=stages,
            checkpointing=not args.no_checkpointing, offload=not args.no_offload,
            offload_device=args.offload_device, **_common_kwargs(args),
        )
    except NoFitError as err:
        print(f"lightning-memopt plan: {' '.join(str(err).split())}")
        return 1
    if args.json:
        _print(plan.to_dict())
    else:
        print(plan.table())
    return 0
