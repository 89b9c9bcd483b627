"""The constructor arguments of :class:`~lightning_memopt.MemOptStrategy`, its own and those of Lightning's
``DeepSpeedStrategy``, resolved into one ZeRO setting and one DeepSpeed config.

Pure: plain values in, plain values out (no Lightning). The strategy tells which arguments the user gave
(``given``: the names whose value differs from both its own and Lightning's default), so that an argument is
refused only when it would be ignored or contradicts another one.
"""

import functools
import inspect
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.core.deepspeed_config import (
    BUCKET_KNOBS,
    OFFLOAD_DEVICES,
    aio_config,
    build_deepspeed_config,
    check_with_deepspeed,
    normalize_offload,
    validate_zero_settings,
    without_disabled_offload,
    zero_stage_of,
)

#: Lightning's default NVMe directory (``DeepSpeedStrategy(nvme_path="/local_nvme")``), used when it exists.
LIGHTNING_NVME_PATH = "/local_nvme"
#: settings that only tune NVMe offload (DeepSpeed's swap buffers and its async I/O library).
AIO_KNOBS = ("block_size", "queue_depth", "single_submit", "overlap_events", "thread_count")
NVME_ONLY = ("params_buffer_count", "params_buffer_size", "max_in_cpu", "optimizer_buffer_count", *AIO_KNOBS)
#: Lightning's switches for ``deepspeed.checkpointing`` (DeepSpeed's ``activation_checkpointing`` config section).
CHECKPOINTING_KNOBS = (
    "partition_activations",
    "cpu_checkpointing",
    "contiguous_memory_optimization",
    "synchronize_checkpoint_boundary",
)
#: fp16 dynamic loss scaling (DeepSpeed's ``fp16`` section), used by Lightning only with ``precision="16-*"``.
LOSS_SCALING = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
#: the arguments that only build the DeepSpeed config: Lightning ignores them when it is given a config.
CONFIG_BUILDING = (
    "offload_optimizer",
    "offload_parameters",
    "offload_optimizer_device",
    "offload_params_device",
    "nvme_path",
    "pin_memory",
    *BUCKET_KNOBS,
    "max_live_parameters",
    "contiguous_gradients",
    "overlap_comm",
    "sub_group_size",
    "allgather_partitions",
    "reduce_scatter",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "logging_batch_size_per_gpu",
    *NVME_ONLY,
    *CHECKPOINTING_KNOBS,
)

#: the arguments handed to :func:`build_deepspeed_config` under their own names.
_BUILD_KNOBS = (
    "pin_memory",
    "contiguous_gradients",
    "overlap_comm",
    "max_live_parameters",
    "sub_group_size",
    "allgather_partitions",
    "reduce_scatter",
    "optimizer_buffer_count",
    "params_buffer_count",
    "params_buffer_size",
    "max_in_cpu",
    "zero_allow_untested_optimizer",
)


@dataclass(frozen=True)
class ZeroSettings:
    """What the arguments resolve to: the ZeRO stage, offload devices, NVMe directory, ``zero.Init``'s remote
    device and the DeepSpeed config handed to Lightning."""

    zero: int
    offload_optimizer: str | None
    offload_parameters: str | None
    nvme_path: str | None
    remote_device: str | None
    config: dict[str, Any] = field(repr=False)


@functools.cache
def signature_defaults(cls: type) -> dict[str, Any]:
    """The default of every argument of ``cls.__init__`` that has one.

    Example:
        >>> class Knobs:
        ...     def __init__(self, stage: int = 2, path: str | None = None) -> None: ...
        >>> signature_defaults(Knobs)
        {'stage': 2, 'path': None}
    """
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def given_arguments(values: Mapping[str, Any], *defaults: Mapping[str, Any]) -> set[str]:
    """The names in ``values`` whose value differs from its default in every one of ``defaults``.

    With MemOptStrategy's and Lightning's defaults, a YAML written for Lightning's strategy (which lists all of
    its defaults) sets nothing. Numbers compare by value (a YAML ``0`` is the default ``0.0``), booleans by identity.

    Example:
        >>> sorted(given_arguments({"stage": 2, "zero": 3, "loss_scale": 0}, {"zero": None},
        ...                        {"stage": 2, "loss_scale": 0.0}))
        ['zero']
    """
    return {name for name, value in values.items() if not any(_is_default(value, d, name) for d in defaults)}


def _is_default(value: Any, defaults: Mapping[str, Any], name: str) -> bool:
    if name not in defaults:
        return False
    default = defaults[name]
    if value is default:
        return True
    if isinstance(value, bool) or isinstance(default, bool):  # True is not 1 here
        return False
    numbers = isinstance(value, (int, float)) and isinstance(default, (int, float))
    return (numbers or type(value) is type(default)) and value == default


def resolve_arguments(
    args: Mapping[str, Any], given: Collection[str], config: dict[str, Any] | None, source: str = "`config`"
) -> ZeroSettings:
    """Resolve the strategy's arguments (``args``, by name) and an optional user ``config``.

    Args:
        args: every constructor argument of the strategy that describes ZeRO, by name.
        given: the names the user set (their value differs from the strategy's and from Lightning's default).
        config: the user's DeepSpeed config (already loaded), or ``None`` to build one from ``args``.
        source: how to name ``config`` in messages (e.g. the environment variable it came from).

    Raises:
        ValueError: contradicting arguments, arguments that ``config`` would make Lightning ignore, or a value
            DeepSpeed's config model rejects.

    Example:
        >>> args = {"zero": None, "stage": 3, "zero_optimization": True, "offload_optimizer": True,
        ...         "offload_optimizer_device": None, "offload_parameters": False, "offload_params_device": None}
        >>> resolve_arguments(args, given={"stage", "offload_optimizer"}, config=None)
        ZeroSettings(zero=3, offload_optimizer='cpu', offload_parameters=None, nvme_path=None, remote_device=None)
    """
    # Lightning's default stage (2) counts as no stage: a YAML listing Lightning's defaults defers to its config
    stage = args.get("stage") if "stage" in given else None
    zero = _stage(args.get("zero"), stage, args.get("zero_optimization", True))
    if config is not None:
        return _from_config(args, given, config, zero, source)
    offload_optimizer = _offload(args, given, "offload_optimizer", "offload_optimizer_device")
    offload_parameters = _offload(args, given, "offload_parameters", "offload_params_device")
    zero = 2 if zero is None else zero
    nvme = "nvme" in (offload_optimizer, offload_parameters)
    nvme_path = args.get("nvme_path")
    if nvme and nvme_path is None and os.path.isdir(LIGHTNING_NVME_PATH):
        nvme_path = LIGHTNING_NVME_PATH
    validate_zero_settings(zero, offload_optimizer, offload_parameters, nvme_path)
    idle = [name for name in NVME_ONLY if name in given]
    if idle and not nvme:
        raise ValueError(
            f"Expected NVMe offload with the NVMe settings {idle}, got offload devices optimizer={offload_optimizer!r},"
            f" parameters={offload_parameters!r}. Fix: offload to NVMe (e.g. `offload_optimizer=True,"
            " offload_optimizer_device='nvme', nvme_path=...`) or drop these settings."
        )
    knobs = {name: bool(args.get(name, False)) for name in CHECKPOINTING_KNOBS}
    micro = args.get("logging_batch_size_per_gpu", "auto")
    if micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise ValueError(
            f"Expected `logging_batch_size_per_gpu` to be 'auto' or an int >= 1, got {micro!r}."
            " Fix: the number of samples in one batch of one rank, or 'auto' to read it from the DataLoader."
        )
    built = build_deepspeed_config(
        zero,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        nvme_path=nvme_path,
        **{name: args[name] for name in _BUILD_KNOBS if name in args},
        aio=aio_config(**{name: args[name] for name in AIO_KNOBS if name in args}) if nvme else None,
        activation_checkpointing=knobs if any(knobs.values()) else None,
        micro_batch_size=None if micro == "auto" else micro,
    )
    check_with_deepspeed("zero_optimization", built["zero_optimization"], "the strategy's arguments")
    remote = _remote_device(args.get("remote_device"), zero, offload_parameters)
    return ZeroSettings(zero, offload_optimizer, offload_parameters, nvme_path, remote, built)


def _from_config(
    args: Mapping[str, Any], given: Collection[str], config: dict[str, Any], zero: int | None, source: str
) -> ZeroSettings:
    ignored = [name for name in CONFIG_BUILDING if name in given]
    if ignored:
        raise ValueError(
            f"Expected either {source} or the arguments {ignored}, got both (Lightning ignores these arguments"
            " when it is given a config). Fix: put these settings into the DeepSpeed config, or drop the config."
        )
    scaling = [name for name in LOSS_SCALING if name in given]
    if scaling and "fp16" in config:
        raise ValueError(
            f"Expected fp16 loss scaling either in the `fp16` section of {source} or as the arguments {scaling},"
            " got both. Fix: keep one of them."
        )
    stage = zero_stage_of(config)
    if zero is not None and zero != stage:
        raise ValueError(
            f"Expected `zero` to match the zero_optimization.stage of {source} ({stage}), got zero={zero}."
            " Fix: drop `zero`/`stage` or change the stage in the config."
        )
    zero_config = config.get("zero_optimization") or {}
    if zero_config:
        check_with_deepspeed("zero_optimization", without_disabled_offload(zero_config), source)
    offload_optimizer = normalize_offload((zero_config.get("offload_optimizer") or {}).get("device"), "device")
    offload_parameters = normalize_offload((zero_config.get("offload_param") or {}).get("device"), "device")
    nvme_path = (zero_config.get("offload_optimizer") or {}).get("nvme_path") or (
        zero_config.get("offload_param") or {}
    ).get("nvme_path")
    validate_zero_settings(stage, offload_optimizer, offload_parameters, nvme_path)
    remote = _remote_device(args.get("remote_device"), stage, offload_parameters)
    return ZeroSettings(stage, offload_optimizer, offload_parameters, nvme_path, remote, config)


def _stage(zero: int | None, stage: int | None, zero_optimization: bool) -> int | None:
    """``zero`` and Lightning's ``stage`` name the same thing; ``zero_optimization=False`` is stage 0."""
    if zero is not None and stage is not None and zero != stage:
        raise ValueError(
            f"Expected `zero` and `stage` (two names of the ZeRO stage) to agree, got zero={zero!r}, stage={stage!r}."
            " Fix: pass only one of them."
        )
    zero = zero if zero is not None else stage
    if not zero_optimization:
        if zero not in (None, 0):
            raise ValueError(
                f"Expected no ZeRO stage (or 0) with zero_optimization=False, got stage {zero!r}."
                " Fix: drop zero_optimization=False to use the stage, or drop the stage."
            )
        return 0
    return zero


def _offload(args: Mapping[str, Any], given: Collection[str], name: str, device_name: str) -> str | None:
    """Our ``offload_x`` (False, True, 'cpu', 'nvme') with Lightning's ``offload_x=True, offload_x_device=...``."""
    value, device = args.get(name, False), args.get(device_name)
    if device is not None and (not isinstance(device, str) or device.lower() not in OFFLOAD_DEVICES):
        raise ValueError(
            f"Expected `{device_name}` to be 'cpu' or 'nvme', got {device!r}."
            f" Fix: {device_name}='cpu' (host memory) or 'nvme' (with nvme_path)."
        )
    device = None if device is None else device.lower()
    if value is True:
        return device or "cpu"
    resolved = normalize_offload(value, name)
    if resolved is None and device_name in given:
        raise ValueError(
            f"Expected `{name}=True` with `{device_name}={device!r}`, got {name}={value!r}."
            f" Fix: `{name}=True, {device_name}={device!r}`, or drop `{device_name}`."
        )
    if resolved is not None and device_name in given and device != resolved:
        raise ValueError(
            f"Expected `{name}` and `{device_name}` to name the same device, got {resolved!r} and {device!r}."
            f" Fix: `{name}=True, {device_name}={device!r}` (Lightning's spelling) or `{name}={device!r}`."
        )
    return resolved


def _remote_device(remote: str | None, zero: int, offload_parameters: str | None) -> str | None:
    """``zero.Init``'s ``remote_device``: only ZeRO-3 partitions at construction; NVMe needs parameter offload
    to NVMe (DeepSpeed asserts it in ``zero.Init``)."""
    if remote is None:
        return None
    if not isinstance(remote, str) or remote.lower() not in (*OFFLOAD_DEVICES, "none"):
        raise ValueError(
            f"Expected `remote_device` to be None, 'cpu' or 'nvme', got {remote!r}."
            " Fix: remote_device='cpu' to create ZeRO-3 partitions in host memory, or None for the device."
        )
    if zero != 3:
        raise ValueError(
            f"Expected `zero=3` with `remote_device={remote!r}`, got zero={zero}. Only ZeRO-3 creates the parameters"
            " partitioned (`deepspeed.zero.Init`). Fix: `stage=3` or drop `remote_device`."
        )
    if remote.lower() == "nvme" and offload_parameters != "nvme":
        raise ValueError(
            "Expected parameter offload to NVMe with remote_device='nvme',"
            f" got offload_parameters={offload_parameters!r}."
            " Fix: `offload_parameters=True, offload_params_device='nvme', nvme_path=...`."
        )
    return remote.lower()
