"""Byte sizes: parsing ``"80GiB"`` and printing ``12.3 GiB``."""

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
GiB = 1024**3


def parse_bytes(value: "int | float | str") -> int:
    """Parse a byte count given as a number or a string with a unit (SI ``GB`` or binary ``GiB``).

    Args:
        value: ``80 * 2**30``, ``"80GiB"``, ``"80 GB"``, ``"1.5e9"``.

    Returns:
        The number of bytes, rounded down.

    Raises:
        ValueError: when the value is negative or cannot be parsed.

    Example:
        >>> parse_bytes("80GiB")
        85899345920
        >>> parse_bytes("1.5 GB")
        1500000000
        >>> parse_bytes(1024)
        1024
    """
    if isinstance(value, bool):
        raise TypeError(f"Expected a byte count (int, float or str like '80GiB'), got {value!r}.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"Expected a memory size like '80GiB', '24 GB', '512MiB' or a number of bytes, got {value!r}."
                f" Known units: {', '.join(u for u in _UNITS if u)}."
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TypeError(f"Expected a byte count (int, float or str like '80GiB'), got {type(value).__name__}.")
    if number < 0:
        raise ValueError(f"Expected a non-negative memory size, got {value!r}.")
    return int(number * _UNITS[unit])


def format_bytes(num_bytes: float, unit: str = "GiB", digits: int = 2) -> str:
    """Format a byte count in a binary unit.

    Example:
        >>> format_bytes(3 * 2**30)
        '3.00 GiB'
        >>> format_bytes(512 * 2**20, unit="MiB", digits=0)
        '512 MiB'
    """
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GiB, "TiB": 1024**4}
    if unit not in scale:
        raise ValueError(f"Expected a unit in {sorted(scale)}, got {unit!r}.")
    return f"{num_bytes / scale[unit]:.{digits}f} {unit}"
