"""Planning on the predictor and the transforms: what-if estimates, the micro-batch / accumulation search, fixes that
fit, and checkpointing to a memory budget."""

from lightning_memopt.planning.budget import CheckpointPlan, checkpoint_to_fit
from lightning_memopt.planning.estimate import estimate_memory
from lightning_memopt.planning.plan import NoFitError, Plan, Setting, plan_batch
from lightning_memopt.planning.suggest import Suggestion, suggest_fixes

__all__ = [
    "CheckpointPlan",
    "NoFitError",
    "Plan",
    "Setting",
    "Suggestion",
    "checkpoint_to_fit",
    "estimate_memory",
    "plan_batch",
    "suggest_fixes",
]
