"""Hugging Face Hub ids (``meta-llama/Llama-3.1-8B``) to configs, through transformers' own loader and cache.

Only the ``config.json`` is read (``transformers.AutoConfig.from_pretrained``): no weights, no custom code
(``trust_remote_code=False``). With ``HF_HUB_OFFLINE=1`` nothing is downloaded and the id must be in the local
cache (``HF_HOME`` / ``HF_HUB_CACHE``, the layout ``huggingface_hub`` writes: ``models--org--name/snapshots/<rev>/``
and ``refs/main``); the variable is read when the config is loaded, not only when ``huggingface_hub`` is imported.

Example:
    >>> is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("llama-3-8b"), is_hub_id("configs/model.json")
    (True, False, False)
"""

import os
import re
from typing import Any

__all__ = ["is_hub_id", "load_hub_config"]

# a Hub repository id: ``owner/name``, each part starting with a letter or digit (huggingface_hub's
# ``validate_repo_id`` rules: letters, digits, ``-``, ``_``, ``.``; at most 96 characters)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id (``owner/name``, not a ``.json`` file name)."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(".json") and ".." not in text


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def load_hub_config(
    repo_id: str,
    *,
    revision: "str | None" = None,
    cache_dir: "str | os.PathLike | None" = None,
    local_files_only: "bool | None" = None,
) -> Any:
    """The ``transformers`` config of a Hub model, from the local cache or (when online) the Hub.

    Args:
        repo_id: the Hub id, e.g. ``"meta-llama/Llama-3.1-8B"``.
        revision: a branch, tag or commit (default ``main``).
        cache_dir: the hub cache to read (default: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
        local_files_only: never download; ``None``: when ``HF_HUB_OFFLINE`` is set.

    Returns:
        The ``PretrainedConfig`` (``.to_dict()`` gives the full config dict).

    Raises:
        ValueError: the id is not in the cache while offline, cannot be fetched, needs custom code, or names a
            model type this transformers does not know; the message says which and how to fix it.
    """
    from huggingface_hub import constants
    from transformers import AutoConfig

    from lightning_memopt.predictor.read.presets import preset_for_hub_id

    offline = _offline() if local_files_only is None else local_files_only
    try:
        return AutoConfig.from_pretrained(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline, trust_remote_code=False
        )
    except (OSError, ValueError) as err:
        text = " ".join(str(err).split())
        reason = text.split(". ")[0]  # transformers' first sentence
        preset = preset_for_hub_id(repo_id)
        alternative = f" or use the preset {preset.name!r} (the same config.json)" if preset else ""
        if "trust_remote_code" in text or "does not recognize this architecture" in text:
            raise ValueError(
                f"Expected a model type that transformers knows for the Hub id {repo_id!r}, got a config that"
                f" needs custom code or a newer transformers ({reason}). Fix: upgrade transformers, or pass"
                f" the parameter count (e.g. '8B') for model states only{alternative}; custom code is never run."
            ) from None
        if offline:
            cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
            raise ValueError(
                f"Expected the Hub id {repo_id!r} in the local Hugging Face cache (offline: nothing is downloaded),"
                f" got no config.json for it under {cache}. Fix: download it once where the"
                f" Hub is reachable (`hf download {repo_id} config.json`), point HF_HOME or HF_HUB_CACHE at a cache"
                f" that holds it, pass a local config.json path{alternative}."
            ) from None
        raise ValueError(
            f"Expected the Hub id {repo_id!r} to resolve to a config.json, got: {reason}. Fix: check the id"
            " and your access (gated models such as meta-llama/* need `hf auth login` and an accepted license),"
            f" set HF_HUB_OFFLINE=1 to use the local cache only, pass a local config.json path{alternative}."
        ) from None
