"""The question the predictor answers, validated once: a :class:`Request` holds every setting of the run to predict
(ranks, ZeRO stage, precision, optimizer, offload, checkpointing, attention, engine, batch, target device), each
checked and resolved before any stage runs. Every stage of the pipeline (:mod:`lightning_memopt.predictor.api`)
reads its settings from it and from nowhere else.

Example:
    >>> req = make_request(zero=3, world_size=8, precision="bf16", optimizer="AdamW")
    >>> req.precision.name, req.optimizer_state_bytes, req.trace_engine
    ('bf16-mixed', 8, 'deepspeed')
    >>> make_request(zero=4)
    Traceback (most recent call last):
    ...
    ValueError: Expected `zero` (the ZeRO stage) in 0..3, got 4. Fix: e.g. zero=3.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightning_memopt.predictor.device import CudaRules, cuda_rules
from lightning_memopt.predictor.precision import Precision, resolve_precision

#: name -> (fp32 state bytes per parameter, step temporaries: "single" | "foreach" | "fused" | "none").
OPTIMIZERS = {
    "adamw": (8, "single"),
    "adam": (8, "single"),
    "adamw-foreach": (8, "foreach"),
    "adam-foreach": (8, "foreach"),
    "adamw-fused": (8, "fused"),
    "adam-fused": (8, "fused"),
    "sgd": (0, "none"),
    "sgd-momentum": (4, "none"),
}
ENGINES = ("deepspeed", "torch", "zero-paper")
METHODS = ("trace",)
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
#: Lightning's precision the predictor assumes when none is given
DEFAULT_PRECISION = resolve_precision("bf16-mixed")


def resolve_optimizer(optimizer: str) -> "tuple[int, str]":
    """(state bytes per parameter, temporaries kind) of an optimizer name.

    Example:
        >>> resolve_optimizer("AdamW")
        (8, 'single')
    """
    key = str(optimizer).strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"Expected optimizer in {sorted(OPTIMIZERS)}, got {optimizer!r}. Fix: e.g. 'adamw'.")
    return OPTIMIZERS[key]


@dataclass(frozen=True)
class Request:
    """One run to predict, every setting validated (see :func:`~lightning_memopt.predictor.api.predict` for their
    meaning). Built by :func:`make_request`; :meth:`on` resolves the target device once the model is read.

    Attributes:
        rules: the target device's rules (``None``: the CPU): the ``device`` asked for, resolved when the request is
            made, else set by :meth:`on` from where the module is.
        device: the ``device`` argument as given (``None``: where the module is).
    """

    world_size: int = 1
    zero: int = 0
    micro_batch_size: "int | None" = None
    seq_len: "int | None" = None
    precision: Precision = DEFAULT_PRECISION
    optimizer: str = "adamw"
    offload_optimizer: "bool | str" = False
    offload_parameters: "bool | str" = False
    activation_checkpointing: "bool | float | int | None" = None
    attention: "str | None" = None
    engine: str = "deepspeed"
    method: str = "trace"
    deepspeed_config: "dict[str, Any] | None" = field(default=None, compare=False)
    example_batch: Any = field(default=None, compare=False)
    accumulate_grad_batches: int = 1
    autocast_cache: bool = False
    device: "str | CudaRules | None" = None
    expandable_segments: "bool | None" = None
    rules: "CudaRules | None" = None

    @property
    def trace_engine(self) -> str:
        """The engine whose dtypes the step is traced with (the ZeRO paper's accounting has DeepSpeed's)."""
        return "deepspeed" if self.engine == "zero-paper" else self.engine

    @property
    def optimizer_state_bytes(self) -> int:
        """fp32 state bytes per trainable parameter (Adam: 8)."""
        return resolve_optimizer(self.optimizer)[0]

    @property
    def optimizer_temporaries(self) -> str:
        """The optimizer step's temporaries: ``"single"``, ``"foreach"``, ``"fused"`` or ``"none"``."""
        return resolve_optimizer(self.optimizer)[1]

    @property
    def replays_allocator(self) -> bool:
        """Whether the run's whole allocation sequence is known, so CUDA's caching allocator is replayed on it: one
        CUDA device, with the plain engine or with DeepSpeed (ZeRO 0-3) without offload or gradient accumulation
        (several ranks' and DDP's buffers, offload and accumulation are not in the replayed sequence yet)."""
        if self.rules is None or self.world_size != 1:
            return False
        offload = self.offload_optimizer or self.offload_parameters
        plain_deepspeed = self.engine == "deepspeed" and not offload and self.accumulate_grad_batches == 1
        return self.engine == "torch" or plain_deepspeed

    def on(self, module_device: "str | None") -> "Request":
        """This request with the target device's rules resolved: the ``device`` asked for, else the device type the
        module is on (``module_device``; ``None`` for a config, a count or a CPU module).

        Raises:
            ValueError: a device that is neither the CPU, CUDA nor a known GPU, with the fix.
        """
        if self.device is not None:  # resolved when the request was made
            return self
        return dataclasses.replace(self, rules=cuda_rules(module_device, expandable_segments=self.expandable_segments))


def make_request(**settings: Any) -> Request:
    """Validate :func:`~lightning_memopt.predictor.api.predict`'s settings (its keyword arguments, by the same names;
    one left out takes its default, the :class:`Request` field's) into a :class:`Request`.

    An offload device set in ``deepspeed_config`` is used when the argument is left ``False``.

    Raises:
        TypeError: a setting ``predict`` does not take.
        ValueError / TypeError: any invalid argument or combination, with the fix.
    """
    fields = {f.name: f for f in dataclasses.fields(Request) if f.name != "rules"}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise TypeError(f"Expected settings among {sorted(fields)}, got {unknown}. Fix: check their names.")
    s = {**{name: f.default for name, f in fields.items()}, **settings}
    _positive_int("world_size", s["world_size"])
    _positive_int("accumulate_grad_batches", s["accumulate_grad_batches"])
    for name in ("micro_batch_size", "seq_len"):
        if s[name] is not None:
            _positive_int(name, s[name])
    config = s["deepspeed_config"]
    for name, key in (("offload_optimizer", "offload_optimizer"), ("offload_parameters", "offload_param")):
        s[name] = _from_config(config, key, _offload(name, s[name]))
    _validate(s)
    resolve_optimizer(s["optimizer"])
    if not isinstance(s["precision"], Precision):
        s["precision"] = resolve_precision(s["precision"])
    if isinstance(s["device"], CudaRules):
        s["rules"] = s["device"]
    elif s["device"] is not None:  # an unknown device is refused before the model is read
        s["rules"] = cuda_rules(s["device"], expandable_segments=s["expandable_segments"])
    s["autocast_cache"] = bool(s["autocast_cache"])
    return Request(**s)


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


def _validate(settings: "dict[str, Any]") -> None:
    """The settings' values and combinations (offload devices already read)."""
    zero, engine, method, attention = (settings[k] for k in ("zero", "engine", "method", "attention"))
    offload_opt, offload_par = settings["offload_optimizer"], settings["offload_parameters"]
    deepspeed_config = settings["deepspeed_config"]
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
        raise ValueError(f"Expected zero=3 with `offload_parameters` (ZeRO-Infinity), got zero={zero}. Fix: zero=3.")
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
