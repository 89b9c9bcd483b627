"""Optional-dependency flags, all in one place: the extras of ``pyproject.toml`` (``liger``, ``flash``, ``peft``,
``plot``). Required packages (torch, lightning, deepspeed, transformers, torchmetrics, psutil) have no flag.

Each flag is a :class:`lightning_utilities.core.imports.RequirementCache`: truthy when the requirement is
installed, and its ``str()`` says how to install it. Import the package itself inside the function that
needs it, never at module level, so that ``import lightning_memopt`` works with only torch and lightning.
"""

from lightning_utilities.core.imports import RequirementCache

_LIGER_KERNEL_AVAILABLE = RequirementCache("liger-kernel")
_FLASH_ATTN_AVAILABLE = RequirementCache("flash-attn")
_MATPLOTLIB_AVAILABLE = RequirementCache("matplotlib")
_PEFT_AVAILABLE = RequirementCache("peft")


def requires(flag: RequirementCache, feature: str, extra: str | None = None) -> None:
    """Raise ``ModuleNotFoundError`` with an install hint when ``flag`` is not satisfied.

    Args:
        flag: the requirement flag from this module.
        feature: what the user asked for, named in the message.
        extra: the ``lightning-memopt`` extra that installs it, if any.

    Example:
        >>> from lightning_utilities.core.imports import RequirementCache
        >>> requires(RequirementCache("torch"), "anything")  # installed: no error
        >>> requires(RequirementCache("surely-not-installed-pkg"), "the demo")
        Traceback (most recent call last):
        ...
        ModuleNotFoundError: the demo needs `surely-not-installed-pkg`, which is not installed. ...
    """
    if flag:
        return
    hint = f"pip install 'lightning-memopt[{extra}]'" if extra else f"pip install '{flag.requirement}'"
    raise ModuleNotFoundError(
        f"{feature} needs `{flag.requirement}`, which is not installed. Install it with: {hint}"
    )
