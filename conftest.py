"""Root pytest setup (applies to the doctests in lightning_memopt/ as well as tests/)."""

import contextlib
import io

# DeepSpeed prints an accelerator notice to stdout on first import; keep it out of the doctests' output.
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    import deepspeed  # noqa: F401
