"""A disk cache of ``estimate`` and ``plan`` answers, so that asking again costs no trace and no torch import.

A prediction traces the model built by transformers, which takes seconds, mostly importing transformers' modeling
code. The answer depends only on the question, the model's config and the code that answers, so it is stored
under a key made of all three: every option of the command, the content of the preset or ``config.json`` (a Hub id
is not cached: its config may change upstream), this package's source files and the versions of the libraries the
prediction runs (torch, transformers, deepspeed, peft, liger-kernel). Any change gives a new key; nothing is ever
stale, only unused.

Where: ``$LIGHTNING_MEMOPT_CLI_CACHE``, else ``$XDG_CACHE_HOME/lightning_memopt/cli``, else
``~/.cache/lightning_memopt/cli``.
``LIGHTNING_MEMOPT_CLI_CACHE=off`` or ``--no-cache`` turns it off; deleting the folder clears it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

ENV = "LIGHTNING_MEMOPT_CLI_CACHE"
#: libraries whose version changes what a prediction traces
LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "liger-kernel")
_OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when the cache is turned off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_memopt" / "cli"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of this package's sources and shipped configs and of the libraries' versions."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the package (its __init__ holds the version)
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for name in LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing".encode())
    return digest.hexdigest()


def _model_content(args: argparse.Namespace) -> str | None:
    """What the answer reads of MODEL: a count, a preset's or a config file's text; ``None`` for a Hub id."""
    from lightning_memopt.predictor.read.presets import CONFIG_DIR, PRESETS

    value = args.model_value
    if isinstance(value, int):
        return str(value)
    name = str(value).strip().lower()
    if name in PRESETS:
        return (CONFIG_DIR / f"{name}.json").read_text()
    if os.path.isfile(value):
        return Path(value).read_text()
    return None


def key(args: argparse.Namespace) -> str | None:
    """The cache key of a prepared ``estimate``/``plan`` command, or ``None`` when it is not cached."""
    if cache_dir() is None or getattr(args, "no_cache", False):
        return None
    content = _model_content(args)
    if content is None:
        return None
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("handler", "model", "model_value")}
    question = json.dumps([args.command, options, content, code_fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(question.encode()).hexdigest()


def lookup(cache_key: str) -> tuple[str, int] | None:
    """The stored ``(stdout, exit code)`` of a key, or ``None``."""
    directory = cache_dir()
    path = directory / f"{cache_key}.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        return str(entry["stdout"]), int(entry["code"])
    except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is a miss
        return None


def store(cache_key: str, stdout: str, code: int) -> None:
    """Store an answer; a cache that cannot be written is skipped silently (it only saves time)."""
    directory = cache_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{cache_key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"stdout": stdout, "code": code}))
        tmp.replace(directory / f"{cache_key}.json")
    except OSError:
        pass
