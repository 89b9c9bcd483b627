"""Pure helpers that build, check and read the DeepSpeed config of :class:`~lightning_memopt.MemOptStrategy`.

No Lightning here: these functions take plain values and return plain dicts, so the predictor and the CLI
can compute the same config the strategy will run with.
"""

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

#: MemOptStrategy's (and DeepSpeed's Python-side) names of the ZeRO-3 knobs -> their ``zero_optimization`` JSON keys.
ZERO_KEYS = {
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
}
#: DeepSpeed 0.19.8 ``runtime/zero/config.py`` defaults, kept as numbers so that reading a config does not import
#: DeepSpeed (``tests/predictor/account/test_deepspeed_defaults.py`` holds them equal to ``DeepSpeedZeroConfig()``).
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "sub_group_size": 1_000_000_000,
    "contiguous_gradients": True,
}
#: DeepSpeed 0.19.8 ``runtime/zero/leaf_module_config.py`` ``DEFAULT_LEAF_MODULE_CLASSES``: every engine flags these
#: as ZeRO-3 leaf modules unless its config's ``zero_optimization.leaf_module`` lists other classes (held equal to
#: DeepSpeed's by the same test).
DEEPSPEED_LEAF_MODULE_CLASSES = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
)
# ``engine.py`` ``MEMORY_OPT_ALLREDUCE_SIZE``: the stage-0 gradient all-reduce flattens this many elements at
# once.
ALLREDUCE_CHUNK = 500_000_000
#: DeepSpeed's own defaults for the bucket knobs, used as upper bounds of the "auto" sizes.
DEEPSPEED_BUCKET_DEFAULT = DEEPSPEED_DEFAULTS["reduce_bucket_size"]
DEEPSPEED_PERSISTENCE_DEFAULT = DEEPSPEED_DEFAULTS["stage3_param_persistence_threshold"]
OFFLOAD_DEVICES = ("cpu", "nvme")
BUCKET_KNOBS = ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "param_persistence_threshold")


def normalize_offload(value: bool | str | None, name: str) -> str | None:
    """Map an offload argument to ``None``, ``"cpu"`` or ``"nvme"``.

    Example:
        >>> normalize_offload(True, "offload_optimizer"), normalize_offload("nvme", "x"), normalize_offload(False, "x")
        ('cpu', 'nvme', None)
    """
    if value is None or value is False or (isinstance(value, str) and value.lower() == "none"):
        return None  # DeepSpeed's own spelling of "no offload" in a config is "none"
    if value is True:
        return "cpu"
    if isinstance(value, str) and value.lower() in OFFLOAD_DEVICES:
        return value.lower()
    raise ValueError(
        f"Expected `{name}` to be False, True, 'cpu' or 'nvme', got {value!r}."
        f" Fix: `MemOptStrategy({name}='cpu')` to offload to host memory, or False to keep it on the device."
    )


def validate_zero_settings(
    zero: int, offload_optimizer: str | None, offload_parameters: str | None, nvme_path: str | None
) -> None:
    """Check that the ZeRO stage and the offload settings go together; raise ``ValueError`` with the fix.

    Example:
        >>> validate_zero_settings(3, "cpu", "cpu", None)
        >>> validate_zero_settings(2, None, "cpu", None)
        Traceback (most recent call last):
        ...
        ValueError: Expected `zero=3` with `offload_parameters='cpu'`, got zero=2. ...
    """
    if isinstance(zero, bool) or not isinstance(zero, int) or zero not in (0, 1, 2, 3):
        raise ValueError(f"Expected `zero` to be one of 0, 1, 2, 3 (the ZeRO stage), got {zero!r}.")
    if offload_parameters is not None and zero != 3:
        raise ValueError(
            f"Expected `zero=3` with `offload_parameters={offload_parameters!r}`, got zero={zero}."
            " Only ZeRO stage 3 partitions (and so can offload) the parameters."
            " Fix: `MemOptStrategy(zero=3, offload_parameters=...)` or drop `offload_parameters`."
        )
    if offload_optimizer is not None and zero == 0:
        raise ValueError(
            f"Expected `zero` in 1, 2, 3 with `offload_optimizer={offload_optimizer!r}`, got zero=0."
            " Optimizer offload (ZeRO-Offload) needs ZeRO sharding. Fix: `MemOptStrategy(zero=1 or 2 or 3, ...)`."
        )
    if "nvme" in (offload_optimizer, offload_parameters) and not nvme_path:
        raise ValueError(
            "Expected `nvme_path` (a directory on a fast local NVMe drive) with NVMe offload, got none."
            " Fix: `MemOptStrategy(..., nvme_path='/local_nvme')`."
        )


def validate_bucket(name: str, value: int | str) -> None:
    """A bucket knob is ``"auto"`` or a positive int (``param_persistence_threshold`` may be 0)."""
    if value == "auto":
        return
    low = 0 if name == "param_persistence_threshold" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected `{name}` to be 'auto' or an int >= {low} (elements), got {value!r}.")


def build_deepspeed_config(
    zero: int,
    offload_optimizer: str | None = None,
    offload_parameters: str | None = None,
    nvme_path: str | None = None,
    pin_memory: bool = False,
    contiguous_gradients: bool = True,
    overlap_comm: bool | None = None,
    max_live_parameters: int = 1_000_000_000,
    *,
    sub_group_size: int | None = None,
    allgather_partitions: bool = True,
    reduce_scatter: bool = True,
    optimizer_buffer_count: int = 4,
    params_buffer_count: int = 5,
    params_buffer_size: int = 100_000_000,
    max_in_cpu: int = 1_000_000_000,
    aio: Mapping[str, Any] | None = None,
    zero_allow_untested_optimizer: bool = True,
    activation_checkpointing: Mapping[str, bool] | None = None,
    micro_batch_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for a ZeRO stage and offload setting (bucket sizes are filled in later).

    The keyword-only arguments carry Lightning's ``DeepSpeedStrategy`` knobs under DeepSpeed's key names:
    ``aio`` (DeepSpeed's async I/O settings, written only with NVMe offload, see :func:`aio_config`),
    ``activation_checkpointing`` (the section for ``deepspeed.checkpointing``, written only when given) and
    ``micro_batch_size`` (``train_micro_batch_size_per_gpu``). ``sub_group_size=None`` keeps DeepSpeed's default.

    Torch optimizers are allowed with ZeRO-Offload (``zero_force_ds_cpu_optimizer: False``): DeepSpeed's
    ``DeepSpeedCPUAdam`` is faster on GPUs but needs a compiled op; return it from ``configure_optimizers`` for speed.

    Example:
        >>> cfg = build_deepspeed_config(3, offload_optimizer="cpu")
        >>> cfg["zero_optimization"]["stage"], cfg["zero_optimization"]["offload_optimizer"]["device"]
        (3, 'cpu')
    """
    zero_config: dict[str, Any] = {
        "stage": zero,
        "contiguous_gradients": contiguous_gradients,
        "allgather_partitions": allgather_partitions,
        "reduce_scatter": reduce_scatter,
    }
    if overlap_comm is not None:
        zero_config["overlap_comm"] = overlap_comm
    if sub_group_size is not None:
        zero_config["sub_group_size"] = sub_group_size
    if zero == 3:
        zero_config["stage3_max_live_parameters"] = max_live_parameters
    offloads = {
        "offload_optimizer": (offload_optimizer, {"buffer_count": optimizer_buffer_count}),
        "offload_param": (
            offload_parameters,
            {"buffer_count": params_buffer_count, "buffer_size": params_buffer_size, "max_in_cpu": max_in_cpu},
        ),
    }
    for key, (device, buffers) in offloads.items():
        if device is not None:
            zero_config[key] = {"device": device, "pin_memory": pin_memory, **buffers}
            if device == "nvme":
                zero_config[key]["nvme_path"] = nvme_path
    config: dict[str, Any] = {
        "zero_allow_untested_optimizer": zero_allow_untested_optimizer,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero_config,
    }
    if "nvme" in (offload_optimizer, offload_parameters) and aio is not None:
        config["aio"] = dict(aio)
    if activation_checkpointing:
        config["activation_checkpointing"] = dict(activation_checkpointing)
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return config


def aio_config(
    block_size: int = 1048576,
    queue_depth: int = 8,
    single_submit: bool = False,
    overlap_events: bool = True,
    thread_count: int = 1,
) -> dict[str, Any]:
    """DeepSpeed's ``aio`` section (NVMe offload I/O) from Lightning's argument names.

    DeepSpeed renamed ``thread_count`` to ``intra_op_parallelism`` (0.15) and ignores the old key, which Lightning
    2.6 still writes; the installed DeepSpeed's name is used here.

    Example:
        >>> aio_config(thread_count=4)["intra_op_parallelism"]
        4
    """
    from deepspeed.runtime.swap_tensor import constants

    threads = getattr(constants, "AIO_INTRA_OP_PARALLELISM", "thread_count")
    return {
        "block_size": block_size,
        "queue_depth": queue_depth,
        "single_submit": single_submit,
        "overlap_events": overlap_events,
        threads: thread_count,
    }


def check_with_deepspeed(section: str, values: Mapping[str, Any], source: str) -> None:
    """Validate a ``zero_optimization`` or ``fp16`` section with DeepSpeed's own config model (its types, ranges and
    enums), so that a bad value fails here, with the field named, instead of inside ``deepspeed.initialize``.

    Example:
        >>> check_with_deepspeed("zero_optimization", {"stage": 3, "sub_group_size": 10**9}, "the arguments")
        >>> check_with_deepspeed("fp16", {"enabled": True, "loss_scale": -1}, "the arguments")
        Traceback (most recent call last):
        ...
        ValueError: Expected DeepSpeed to accept `fp16.loss_scale` from the arguments, got -1 (Value error, ...
    """
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    model = {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config}[section]
    try:
        model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ValueError(
            f"Expected DeepSpeed to accept `{section}.{field}` from {source}, got {first.get('input')!r}"
            f" ({first['msg']}). Fix: correct that setting (the strategy argument of that name, or the key in the"
            " DeepSpeed config); see https://www.deepspeed.ai/docs/config-json/."
        ) from None


def infer_hidden_size(module: nn.Module) -> int | None:
    """The model width: a Hugging Face ``config.hidden_size`` (or ``n_embd``/``d_model``) found on the module or
    its submodules, else the most common ``in_features`` of its ``nn.Linear`` layers; ``None`` if neither exists.

    Example:
        >>> infer_hidden_size(nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(32, 8)))
        32
    """
    for sub in module.modules():
        config = getattr(sub, "config", None)
        for key in ("hidden_size", "n_embd", "d_model"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
    widths = collections.Counter(m.in_features for m in module.modules() if isinstance(m, nn.Linear))
    return widths.most_common(1)[0][0] if widths else None


def auto_bucket_sizes(hidden_size: int | None, largest_parameter: int = 0) -> dict[str, int]:
    """Bucket sizes scaled to the model, following the Hugging Face DeepSpeed integration's ``"auto"`` values
    (transformers ``integrations/deepspeed.py``: reduce bucket = hidden², stage-3 prefetch = 0.9 hidden²,
    persistence threshold = 10 hidden), kept at least as large as the largest parameter tensor and at most
    DeepSpeed's defaults (5e8 elements; 1e5 for the persistence threshold).

    Example:
        >>> auto_bucket_sizes(64, largest_parameter=16384)
        {'reduce_bucket_size': 16384, 'allgather_bucket_size': 16384, 'prefetch_bucket_size': 14745, \
'param_persistence_threshold': 640}
        >>> auto_bucket_sizes(None)["reduce_bucket_size"]
        500000000
    """
    if hidden_size is None:
        bucket = DEEPSPEED_BUCKET_DEFAULT
        persistence = DEEPSPEED_PERSISTENCE_DEFAULT
    else:
        bucket = min(DEEPSPEED_BUCKET_DEFAULT, max(hidden_size * hidden_size, largest_parameter))
        persistence = min(DEEPSPEED_PERSISTENCE_DEFAULT, 10 * hidden_size)
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "prefetch_bucket_size": int(0.9 * bucket),
        "param_persistence_threshold": persistence,
    }


def apply_bucket_sizes(config: dict[str, Any], sizes: Mapping[str, int]) -> None:
    """Write bucket sizes into ``config["zero_optimization"]`` under DeepSpeed's key names, never overwriting a key
    the config already has."""
    zero_config = config.setdefault("zero_optimization", {})
    for name, value in sizes.items():
        if name.startswith(("prefetch", "param_persistence")) and zero_config.get("stage", 0) != 3:
            continue
        zero_config.setdefault(ZERO_KEYS[name], int(value))


def without_disabled_offload(zero_config: Mapping[str, Any]) -> dict[str, Any]:
    """``zero_config`` without ``offload_optimizer``/``offload_param`` entries set to ``False`` or ``None``.

    Configs written for older DeepSpeed (and Lightning's own tests) say ``"offload_optimizer": false`` for "no
    offload", which DeepSpeed 0.19's config model rejects (it expects a section).

    Example:
        >>> without_disabled_offload({"stage": 2, "offload_optimizer": False})
        {'stage': 2}
    """
    offloads = ("offload_optimizer", "offload_param")
    return {k: v for k, v in zero_config.items() if not (k in offloads and v in (False, None))}


def resolve_bucket_sizes(config: dict[str, Any], module: nn.Module, arguments: Mapping[str, Any]) -> None:
    """Write the bucket ``arguments`` into ``config``, each ``"auto"`` sized to ``module`` (:func:`auto_bucket_sizes`
    with its width and largest parameter); keys the config already has are kept.

    Example:
        >>> cfg = {"zero_optimization": {"stage": 2}}
        >>> resolve_bucket_sizes(cfg, nn.Linear(64, 64), {"reduce_bucket_size": "auto", "allgather_bucket_size": 10})
        >>> cfg["zero_optimization"]
        {'stage': 2, 'reduce_bucket_size': 4096, 'allgather_bucket_size': 10}
    """
    largest = max((p.numel() for p in module.parameters()), default=0)
    auto = auto_bucket_sizes(infer_hidden_size(module), largest)
    apply_bucket_sizes(config, {name: auto[name] if value == "auto" else value for name, value in arguments.items()})


def zero_stage_of(config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config selects (0 when it has no ``zero_optimization``)."""
    zero_config = config.get("zero_optimization") or {}
    return int(zero_config.get("stage", 0))


def zero_settings(deepspeed_config: "dict[str, Any] | None") -> "dict[str, Any]":
    """Bucket and threshold settings of a DeepSpeed config, DeepSpeed's defaults where absent.

    Example:
        >>> zero_settings({"zero_optimization": {"reduce_bucket_size": 2e8}})["reduce_bucket_size"]
        200000000
    """
    zero = dict((deepspeed_config or {}).get("zero_optimization", {}) or {})
    out = dict(DEEPSPEED_DEFAULTS)
    for key, value in zero.items():
        key = ZERO_KEYS.get(key, key)
        if key in out and value is not None:
            if isinstance(value, str):
                raise ValueError(
                    f"Expected a number for zero_optimization.{key}, got {value!r} ('auto' is unresolved)."
                )
            out[key] = bool(value) if key == "contiguous_gradients" else int(value)
    out["overlap_comm"] = zero.get("overlap_comm")
    return out


@dataclass(frozen=True)
class LeafModules:
    """Which modules a DeepSpeed engine makes ZeRO-3 leaf modules: its config's ``zero_optimization.leaf_module``
    (``runtime/zero/leaf_module_config.py``: ``classes``, ``names``, ``name_suffixes``), applied to the engine's
    module by ``utils/z3_leaf_module.py`` ``apply_zero_leaf_module_config``. The default is DeepSpeed's.

    Example:
        >>> leaves = LeafModules.from_config({"zero_optimization": {"leaf_module": {"name_suffixes": "mlp"}}})
        >>> leaves.matches("model.layers.0.mlp", nn.Linear(1, 1)), leaves.matches("model.layers.0", nn.Linear(1, 1))
        (True, False)
        >>> "MixtralSparseMoeBlock" in LeafModules().classes[0]
        True
    """

    classes: "tuple[str, ...]" = DEEPSPEED_LEAF_MODULE_CLASSES
    names: "tuple[str, ...]" = ()
    name_suffixes: "tuple[str, ...]" = ()

    @classmethod
    def from_config(cls, deepspeed_config: "Mapping[str, Any] | None") -> "LeafModules":
        """The leaf modules of a DeepSpeed config, DeepSpeed's defaults for the keys it does not set.

        Raises:
            ValueError: a ``leaf_module`` that is not a mapping of those three keys to a string or a list of strings.
        """
        section = ((deepspeed_config or {}).get("zero_optimization") or {}).get("leaf_module")
        if section is None:
            return cls()
        fields = ("classes", "names", "name_suffixes")
        unknown = set(section) - set(fields) if isinstance(section, Mapping) else None
        if unknown is None or unknown:
            raise ValueError(
                f"Expected `zero_optimization.leaf_module` to be a mapping with keys {', '.join(fields)},"
                f" got {section!r}. Fix: list the leaf modules' classes, names or name suffixes under those keys."
            )
        values, defaults = {}, cls()
        for key in fields:
            value = section.get(key, getattr(defaults, key))
            value = [value] if isinstance(value, str) else value  # DeepSpeed takes one string as a list of one
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"Expected `zero_optimization.leaf_module.{key}` to be a string or a list of strings, got"
                    f" {value!r}. Fix: give the {key.replace('_', ' ')} as strings."
                )
            values[key] = tuple(dict.fromkeys(value))  # DeepSpeed drops repeats
        return cls(**values)

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether DeepSpeed flags ``module``, named ``name`` in the engine's ``named_modules()``, as a leaf: by its
        class's name or qualified name (``_do_set_z3_leaf_modules``), its exact name or a suffix of it."""
        cls = type(module)
        return (
            any(c in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}") for c in self.classes)
            or name in self.names
            or any(name.endswith(suffix) for suffix in self.name_suffixes)
        )


#: DeepSpeed's default leaf modules (a config without ``zero_optimization.leaf_module``)
DEFAULT_LEAF_MODULES = LeafModules()
