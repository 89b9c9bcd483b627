"""What a module holds besides its parameters and buffers: the Hugging Face model inside it and the tensors it keeps
as plain attributes. One rule for each, shared by the predictor's reading and trace."""

from collections.abc import Iterator

import torch
from torch import nn


def tensor_attributes(module: nn.Module) -> "Iterator[tuple[str, torch.Tensor]]":
    """Tensors held as plain attributes of ``module`` or its submodules (not parameters or buffers), each once.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> layer.table = torch.zeros(3)
        >>> [(n, t.numel()) for n, t in tensor_attributes(layer)]
        [('table', 3)]
    """
    seen: set[int] = set()
    for owner, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and id(value) not in seen:
                seen.add(id(value))
                yield (f"{owner}.{key}" if owner else key), value



def find_hf_model(module: nn.Module) -> "nn.Module | None":
    """The first module (breadth-first) carrying a Hugging Face config (``to_dict`` and ``model_type``)."""
    queue = [module]
    while queue:
        current = queue.pop(0)
        config = getattr(current, "config", None)
        if config is not None and callable(getattr(config, "to_dict", None)) and hasattr(config, "model_type"):
            return current
        queue.extend(current.children())
    return None
