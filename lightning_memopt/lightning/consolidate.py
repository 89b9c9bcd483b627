"""Turn a sharded DeepSpeed checkpoint directory (as ``MemOptStrategy`` saves it) into one fp32 state dict file."""

from pathlib import Path
from typing import Any

import torch

_PATH = str | Path


def consolidate_checkpoint(checkpoint_dir: _PATH, output_file: _PATH) -> dict[str, Any]:
    """Write a single-file checkpoint with an fp32 ``state_dict`` gathered from every rank's shard.

    ZeRO 1-3 checkpoints are merged by Lightning's
    :func:`~lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict` (DeepSpeed's
    ``zero_to_fp32`` underneath, from the fp32 master partitions). A ZeRO-0 checkpoint is not sharded: its
    module weights are read directly and upcast to fp32. The result loads with
    ``LightningModule.load_state_dict(torch.load(output_file)["state_dict"], strict=True)`` and with
    ``LightningModule.load_from_checkpoint(output_file)``.

    Args:
        checkpoint_dir: the checkpoint path a ``MemOptStrategy`` run saved (a directory).
        output_file: where to write the consolidated checkpoint.

    Returns:
        The checkpoint dict that was saved (Lightning's keys plus ``state_dict``).

    Raises:
        FileNotFoundError: when ``checkpoint_dir`` is not a DeepSpeed checkpoint directory.
    """
    from deepspeed.utils.zero_to_fp32 import get_optim_files
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict, ds_checkpoint_dir

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(
            f"Expected a DeepSpeed checkpoint directory (MemOptStrategy saves one per checkpoint), got {checkpoint_dir}"
            " which is not a directory."
        )
    tag_dir = Path(ds_checkpoint_dir(checkpoint_dir))
    try:
        get_optim_files(str(tag_dir))
    except FileNotFoundError:
        return _consolidate_unsharded(tag_dir, Path(output_file))
    return convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)


def _consolidate_unsharded(tag_dir: Path, output_file: Path) -> dict[str, Any]:
    model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"Expected `mp_rank_00_model_states.pt` in {tag_dir}, found no model states there.")
    checkpoint = torch.load(model_files[0], map_location="cpu", weights_only=False)
    state_dict = {
        key.removeprefix("_forward_module."): value.float() if value.is_floating_point() else value
        for key, value in checkpoint.pop("module").items()
    }
    for key in ("optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
                "dp_world_size", "mp_world_size"):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = state_dict
    torch.save(checkpoint, output_file)
    return checkpoint
