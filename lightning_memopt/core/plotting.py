"""The drawing shared by the memory plots: predicted categories stacked from zero, the device and budget lines.

matplotlib is optional (``pip install 'lightning-memopt[plot]'``); :func:`pyplot` raises with that hint when it is
missing. Used by ``MemoryMonitor``'s plot and by ``lightning-memopt plot``; nothing here imports Lightning.

Example:
    >>> unit_for(3 * 2**30)
    ('GiB', 1073741824)
    >>> group({"parameters": 1, "gradients": 2, "optimizer_states": 3, "activations": 4, "logits": 5, "buffers": 6},
    ...       MONITOR_GROUPS)
    {'model states': 6, 'activations': 4, 'logits': 5, 'buffers': 6}
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_memopt._imports import _MATPLOTLIB_AVAILABLE, requires

__all__ = [
    "CATEGORY_GROUPS", "COLORS", "MONITOR_GROUPS", "draw_limits", "group", "legend_patches", "pyplot", "save",
    "unit_for",
]  # fmt: skip

#: The predictor's six categories, each its own band (model states in blues, activations in oranges).
CATEGORY_GROUPS: "dict[str, tuple[str, ...]]" = {
    "parameters": ("parameters",),
    "gradients": ("gradients",),
    "optimizer states": ("optimizer_states",),
    "activations": ("activations",),
    "logits": ("logits",),
    "buffers": ("buffers",),
}
#: The four bands of the monitor's plot: the ZeRO paper's model states, then what grows with the tokens.
MONITOR_GROUPS: "dict[str, tuple[str, ...]]" = {
    "model states": ("parameters", "gradients", "optimizer_states"),
    "activations": ("activations",),
    "logits": ("logits",),
    "buffers": ("buffers",),
}
COLORS = {
    "parameters": "#08519c",
    "gradients": "#3182bd",
    "optimizer states": "#9ecae1",
    "model states": "#4292c6",
    "activations": "#fd8d3c",
    "logits": "#d94801",
    "buffers": "#969696",
    "other": "#d9d9d9",
}


def group(parts: "Mapping[str, int]", groups: "Mapping[str, Sequence[str]]") -> "dict[str, int]":
    """Sum the predictor's categories (``parts``, e.g. ``MemoryEstimate.to_dict()``) into the named bands."""
    return {name: sum(int(parts.get(c, 0)) for c in members) for name, members in groups.items()}


def legend_patches(names: "Sequence[str]") -> "list[Any]":
    """Legend handles of full-colour bands (independent of how the bands are drawn)."""
    from matplotlib.patches import Patch

    return [Patch(color=COLORS[name], label=name) for name in names]


def unit_for(num_bytes: float) -> "tuple[str, int]":
    """``("GiB", 2**30)`` from 1 GiB up, else ``("MiB", 2**20)``."""
    return ("GiB", 2**30) if num_bytes >= 2**30 else ("MiB", 2**20)


def pyplot(feature: str) -> Any:
    """``matplotlib.pyplot`` with the file-only ``Agg`` backend; raises with the install hint without matplotlib."""
    requires(_MATPLOTLIB_AVAILABLE, feature, "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_limits(
    ax: Any, device: "int | None", margin: float, top: float, scale: int, unit: str, clip: float = 0.0
) -> float:
    """Draw the device line (red, dashed) and the budget ``device * (1 - margin)`` (red, dotted) from zero up.

    A device more than three times above the data would flatten it: it is then named in a corner instead of drawn.
    With ``clip``, the axis ends at ``clip`` times the device when the data goes higher (the caller labels what is
    cut off). Returns the top of the y axis (in ``unit``), which always starts at zero.
    """
    if clip and device:
        top = min(top, clip * device)
    ymax = top * 1.15 / scale
    if not device:
        ax.set_ylim(0, ymax)
        return ymax
    if device > 3 * top:
        ax.text(0.99, 0.98, f"device: {device / scale:,.1f} {unit} (above the scale)", transform=ax.transAxes,
                ha="right", va="top", fontsize="small", color="#a50f15")  # fmt: skip
        ax.set_ylim(0, ymax)
        return ymax
    ax.axhline(
        device / scale, color="#a50f15", linestyle="--", linewidth=1.5, label=f"device ({device / scale:,.1f} {unit})"
    )
    if margin:
        budget = device * (1 - margin)
        ax.axhline(budget / scale, color="#a50f15", linestyle=":", linewidth=1.2,
                   label=f"budget ({margin:.0%} kept free)")  # fmt: skip
    ymax = max(ymax, device * 1.08 / scale)
    ax.set_ylim(0, ymax)
    return ymax


def save(fig: Any, path: "str | Path") -> Path:
    """Save a figure as a PNG (parents created) and close it; returns the path."""
    plt = pyplot("saving a plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
