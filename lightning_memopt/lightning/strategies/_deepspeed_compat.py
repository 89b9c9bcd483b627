"""Workarounds for Lightning's ``DeepSpeedStrategy`` and DeepSpeed internals, in one place.

Each one touches a private API or a DeepSpeed bug, is scoped to the call (or undone at teardown) and switches
itself off when the library no longer needs it (checked by feature, not by version number).
"""

import argparse
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

#: the module-level settings of ``deepspeed.runtime.activation_checkpointing.checkpointing`` that ``configure``
#: writes (DeepSpeed private globals; saved before and restored after a fit).
_CHECKPOINTING_GLOBALS = (
    "mpu",
    "num_layers",
    "deepspeed_checkpointing_enabled",
    "PARTITION_ACTIVATIONS",
    "CONTIGUOUS_CHECKPOINTING",
    "CPU_CHECKPOINT",
    "SYNCHRONIZE",
    "PROFILE_TIME",
)


@contextmanager
def device_rank_for_deepspeed(local_rank: int) -> Iterator[None]:
    """Lightning passes ``args.device_rank = root_device.index`` to ``deepspeed.initialize``; a CPU device has no
    index (``None``), which ``DeepSpeedEngine._set_distributed_vars`` compares with ``>= 0``. Give DeepSpeed the
    local rank instead, for the duration of the call (``deepspeed.initialize`` is restored afterwards)."""
    import deepspeed

    original = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:
        namespace = kwargs.get("args")
        if isinstance(namespace, argparse.Namespace) and getattr(namespace, "device_rank", 0) is None:
            namespace.device_rank = local_rank
        return original(*args, **kwargs)

    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = original


@contextmanager
def zero3_load_without_optimizer(engine: Any) -> Iterator[None]:
    """Let a ZeRO-3 engine built without an optimizer (validate, test, predict) load a sharded checkpoint.

    ``DeepSpeedEngine.load_checkpoint(load_optimizer_states=False)`` loads the consolidated fp32 weights into the
    partitions, then calls ``self.optimizer._restore_from_bit16_weights()`` to refresh the fp32 master copy; without
    an optimizer ``self.optimizer`` is the ``DeepSpeedZeRoOffload`` parameter manager, which has no such method
    (DeepSpeed #7272, open; first reported as #2449, the reason Lightning marks its ZeRO-3 test-after-fit xfail).
    There is no master copy to refresh, so the call is made a no-op on this object for the duration of the load.
    """
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or hasattr(optimizer, "_restore_from_bit16_weights"):
        yield
        return
    optimizer._restore_from_bit16_weights = lambda: None
    try:
        yield
    finally:
        del optimizer._restore_from_bit16_weights


def configure_deepspeed_checkpointing(section: Mapping[str, Any]) -> Callable[[], None]:
    """Configure ``deepspeed.checkpointing`` from a config's ``activation_checkpointing`` section, with every key
    Lightning's strategy writes (Lightning forwards all but ``synchronize_checkpoint_boundary``), and return the
    function that restores DeepSpeed's previous settings (they are process-wide)."""
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import checkpointing

    saved = {name: getattr(checkpointing, name) for name in _CHECKPOINTING_GLOBALS if hasattr(checkpointing, name)}
    deepspeed.checkpointing.configure(
        mpu_=None,
        partition_activations=section.get("partition_activations"),
        contiguous_checkpointing=section.get("contiguous_memory_optimization"),
        num_checkpoints=section.get("number_checkpoints"),
        checkpoint_in_cpu=section.get("cpu_checkpointing"),
        synchronize=section.get("synchronize_checkpoint_boundary"),
        profile=section.get("profile"),
    )

    def restore() -> None:
        for name, value in saved.items():
            setattr(checkpointing, name, value)

    return restore


def restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide replacement of ``torch.nn.functional.linear`` (``zero.Init`` swaps in its
    ``zero3_linear_wrap`` and leaves it, "This will persist unless manually reset"), so models trained or traced
    later in the process run PyTorch's own linear. The next ZeRO-3 ``zero.Init`` swaps it in again."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def release_engine(engine: Any) -> None:
    """Let go of what keeps a DeepSpeed engine's model alive after its fit, so that the model, its flat buffers,
    fp32 partitions and optimizer states are freed once the user drops them (DeepSpeed 0.19.8; each part checked by
    feature, a no-op where it is absent):

    * **Gradient hooks** (ZeRO 1-3): ``register_grad_hook`` puts a post-accumulate-grad hook on every trainable
      parameter whose closure holds the ZeRO optimizer, which holds the parameters. Python's garbage collector does
      not follow a tensor's hooks while its storage is shared, so the cycle is never collected: after a fit the
      whole engine stayed alive (measured on CPU at ZeRO-1/2/3; 4.0 GB per fit of a 0.50B model on an H200,
      ``benchmarks/results/gpu_2026-12-04/rerun/speed_zero.json``). ``DeepSpeedEngine.destroy`` removes them but,
      at ZeRO-3, also the module hooks that fetch the partitioned parameters, without which the trained model
      cannot run outside the Trainer: only the gradient hooks (and ZeRO-3's leaf-module hooks) are removed here.
    * **``FWD_MODULE_STACK``** (ZeRO-3, ``zero/parameter_offload.py``): ``DeepSpeedZeRoOffload.__init__`` appends
      the engine's module to this module-level list and nothing pops it, and a checkpointed block's recomputation in
      backward leaves the sub-modules it pushed there. Each module's forward pre-hook pushes it again for each
      forward, so at teardown (no forward running) no entry of the engine's modules is needed.
    * **The coordinator's cache** (ZeRO-3, ``zero/partitioned_param_coordinator.py``): ``__params_to_release`` is a
      ``functools.lru_cache`` on a method, keyed by the coordinator and its sub-modules. It is only a cache: it is
      cleared (for every coordinator), and this engine's coordinator gets the uncached function as an attribute of
      its own, so that the model run again after its fit (generation, say) does not fill it again.

    A later fit, validate or test on the same model builds a new engine (Lightning's ``DeepSpeedStrategy.setup``),
    which registers its own hooks.
    """
    from deepspeed import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        return
    optimizer = getattr(engine, "optimizer", None)
    for name in ("_grad_acc_hooks", "_leaf_module_hooks"):
        hooks = getattr(optimizer, name, None)
        if isinstance(hooks, list):
            for hook in hooks:
                hook.remove()
            hooks.clear()
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        owned = {id(module) for module in engine.module.modules()}
        stack[:] = [module for module in stack if id(module) not in owned]
    method = getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                     "_PartitionedParameterCoordinator__params_to_release", None)  # fmt: skip
    cells = [cell.cell_contents for cell in getattr(method, "__closure__", None) or ()]  # under ``instrument_w_nvtx``
    cache = next((f for f in [method, *cells] if hasattr(f, "cache_clear")), None)
    if cache is None:
        return
    cache.cache_clear()
    offload = getattr(optimizer, "parameter_offload", optimizer)  # a training engine's, or an inference engine's
    coordinator = offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None
    if coordinator is not None and hasattr(cache, "__wrapped__"):
        uncached = types.MethodType(cache.__wrapped__, coordinator)
        coordinator._PartitionedParameterCoordinator__params_to_release = uncached
