"""Lightning precision names -> the dtypes each engine stores and computes in.

Lightning's names (``lightning.fabric.connector._PRECISION_INPUT``) are accepted, with the short aliases
Lightning itself maps (``"bf16"`` -> ``"bf16-mixed"``, ``"16"`` -> ``"16-mixed"``, ``"32"`` -> ``"32-true"``).
"""

from dataclasses import dataclass

import torch

_ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "64": "64-true", "half": "16-mixed"}


@dataclass(frozen=True)
class Precision:
    """What one Lightning precision setting means for storage and compute.

    Attributes:
        name: the canonical Lightning name.
        compute_dtype: the dtype activations are computed and saved in (autocast's or the weights').
        half: whether a 16-bit format is involved (``*-mixed`` or ``*-true`` with 16 bits).
        mixed: ``*-mixed``: fp32 master weights exist (DeepSpeed: fp32 partition; torch: fp32 params +
            autocast).
    """

    name: str
    compute_dtype: torch.dtype
    half: bool
    mixed: bool

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the compute dtype."""
        return torch.empty((), dtype=self.compute_dtype).element_size()

    def param_dtype(self, engine: str) -> "torch.dtype | None":
        """The dtype of the floating parameters the forward pass reads (``None``: as the module holds them).

        DeepSpeed casts the module to fp16/bf16 for every 16-bit setting and keeps an fp32 master copy in its
        optimizer (DeepSpeed ``engine.py``, ``_configure_distributed_model``); Lightning's ``*-true`` precisions
        convert the module to their dtype; plain torch ``*-mixed`` leaves the module as it is and autocasts (fp32
        weights are the usual choice: Micikevicius et al. 2018, "Mixed Precision Training", section 3).

        Example:
            >>> resolve_precision("bf16-mixed").param_dtype("deepspeed")
            torch.bfloat16
            >>> resolve_precision("bf16-mixed").param_dtype("torch") is None
            True
        """
        if engine == "deepspeed" and self.half:
            return self.compute_dtype
        if self.mixed:
            return None
        return self.compute_dtype

    def param_bytes(self, engine: str, held: torch.dtype = torch.float32) -> int:
        """Bytes per parameter element of :meth:`param_dtype` (``held`` when the module keeps its own)."""
        return torch.empty((), dtype=self.param_dtype(engine) or held).element_size()


PRECISIONS = {
    "32-true": Precision("32-true", torch.float32, half=False, mixed=False),
    "64-true": Precision("64-true", torch.float64, half=False, mixed=False),
    "16-mixed": Precision("16-mixed", torch.float16, half=True, mixed=True),
    "bf16-mixed": Precision("bf16-mixed", torch.bfloat16, half=True, mixed=True),
    "16-true": Precision("16-true", torch.float16, half=True, mixed=False),
    "bf16-true": Precision("bf16-true", torch.bfloat16, half=True, mixed=False),
}


def resolve_precision(precision: "str | int") -> Precision:
    """Map a Lightning precision name (or alias) to :class:`Precision`.

    Raises:
        ValueError: for an unknown name.

    Example:
        >>> resolve_precision("bf16").name
        'bf16-mixed'
        >>> resolve_precision(32).compute_bytes
        4
    """
    key = str(precision).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(
            f"Expected a Lightning precision in {sorted(PRECISIONS)} (or alias {sorted(_ALIASES)}), got"
            f" {precision!r}. Fix: pass e.g. precision='bf16-mixed'."
        )
    return PRECISIONS[key]
