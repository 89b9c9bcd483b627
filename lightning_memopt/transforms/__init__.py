"""Model transforms: pure ``nn.Module -> nn.Module`` functions that lower activation memory.

Each modifies the module in place, returns it, and records what it applied on the root module, read back with
:func:`applied_transforms` (what the predictor is told).
"""

from lightning_memopt.transforms._applied import applied_transforms
from lightning_memopt.transforms.attention import apply_attention
from lightning_memopt.transforms.checkpointing import (
    apply_activation_checkpointing,
    blocks_to_checkpoint,
    remove_activation_checkpointing,
)
from lightning_memopt.transforms.fused_cross_entropy import fused_linear_cross_entropy
from lightning_memopt.transforms.liger import apply_liger

__all__ = [
    "applied_transforms",
    "apply_activation_checkpointing",
    "apply_attention",
    "apply_liger",
    "blocks_to_checkpoint",
    "fused_linear_cross_entropy",
    "remove_activation_checkpointing",
]
