"""BatchPlanner: set the micro-batch and gradient accumulation for a global batch in tokens, before fit, by prediction.

The lecture's recipe (section 3): memory depends only on the micro-batch, optimisation on the global batch in tokens
(``micro_batch x seq_len x accumulate_grad_batches x world_size``); so find the largest micro-batch that fits first,
then reach the global batch with gradient accumulation. Unlike Lightning's ``BatchSizeFinder`` (which refuses
distributed runs and finds the limit by trial out-of-memory errors), this predicts
(:func:`~lightning_memopt.planning.estimate_memory`, monotone in the micro-batch, so a binary search finds the
largest that fits) and runs nothing; every rank gets rank zero's decision. Each micro-batch is predicted with the
accumulation it needs (accumulating keeps the gradients between micro-steps, which raises the peak).
"""

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_memopt.core.units import format_bytes, parse_bytes
from lightning_memopt.lightning._run_reader import ReadsRun, RunReader, lightning_step, read_run


class BatchPlanner(ReadsRun):
    """Choose the micro-batch (the model's or datamodule's ``batch_size``) and ``accumulate_grad_batches`` in setup.

    With the run's own settings (strategy, ZeRO stage, offload, transforms, precision, optimizer, world size), it
    finds the largest micro-batch whose predicted peak fits ``device_memory * (1 - margin)``, the accumulation that
    reaches ``global_batch_tokens``, and then the smallest micro-batch that needs no more accumulation steps (the same
    number of steps, the least overshoot), as :func:`~lightning_memopt.planning.plan_batch` does. It changes
    nothing else (the strategy is already built): to let it change the ZeRO stage or checkpointing, use ``plan_batch``
    before building the Trainer.

    The decision is in :attr:`result` and logged as hyperparameters ``batch_planner/<key>``: ``micro_batch_size``,
    ``max_micro_batch_size``, ``accumulate_grad_batches``, ``global_batch_tokens``, ``achieved_global_batch_tokens``,
    ``seq_len``, ``world_size``, ``budget_bytes``, ``predicted_peak_bytes`` (at the chosen micro-batch) and
    ``next_predicted_peak_bytes`` (at ``max_micro_batch_size + 1``: why no larger one was taken).

    Args:
        global_batch_tokens: the target global batch in tokens (``4e6``); the achieved one is at least this.
        device_memory: one device's memory (bytes or ``"80GiB"``).
        margin: fraction of the device kept free, in [0, 1).
        seq_len: tokens per sample; ``None``: read from the first training batch.
        batch_size_attr: the attribute holding the micro-batch, on the LightningModule or its datamodule.
        optimizer: the predictor's optimizer name; ``None``: read from ``configure_optimizers``.

    Raises:
        ValueError: for a non-positive ``global_batch_tokens`` or ``seq_len``, a margin outside [0, 1), or an
            unparsable ``device_memory``.
        MisconfigurationException: in ``setup``, when no ``batch_size_attr`` exists, ``accumulate_grad_batches`` is
            already set, or micro-batch 1 does not fit.

    Example:
        >>> BatchPlanner(global_batch_tokens=4e6, device_memory="80GiB").global_batch_tokens
        4000000
    """

    def __init__(
        self,
        global_batch_tokens: "int | float",
        device_memory: "int | float | str",
        margin: float = 0.1,
        seq_len: int | None = None,
        batch_size_attr: str = "batch_size",
        optimizer: str | None = None,
    ) -> None:
        if isinstance(global_batch_tokens, float) and global_batch_tokens.is_integer():
            global_batch_tokens = int(global_batch_tokens)
        if (
            not isinstance(global_batch_tokens, int)
            or isinstance(global_batch_tokens, bool)
            or global_batch_tokens < 1
        ):
            raise ValueError(
                f"Expected `global_batch_tokens` to be a positive int (e.g. 4e6), got {global_batch_tokens!r}."
            )
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"Expected `seq_len` to be a positive int or None, got {seq_len!r}.")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
            raise ValueError(
                f"Expected `margin` in [0, 1), got {margin!r}. Fix: e.g. margin=0.1 keeps 10 % free."
            )
        try:
            self.device_memory = parse_bytes(device_memory)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Expected `device_memory` like '80GiB' or a number of bytes, got {device_memory!r}. {err}"
            ) from err
        self.global_batch_tokens = global_batch_tokens
        self.margin = float(margin)
        self.seq_len = seq_len
        self.batch_size_attr = batch_size_attr
        self.optimizer = optimizer
        #: the decision (see the class docstring), set in ``setup``.
        self.result: dict[str, Any] = {}

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._plan(trainer, pl_module)

    def _plan(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not lightning_hasattr(pl_module, self.batch_size_attr):
            raise MisconfigurationException(
                f"Expected `{self.batch_size_attr}` on the LightningModule, its hparams or its datamodule, got none."
                " Fix: give the datamodule a `batch_size` its train_dataloader uses, or pass batch_size_attr=..."
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                "Expected `Trainer(accumulate_grad_batches=1)` with BatchPlanner,"
                f" got {trainer.accumulate_grad_batches}. Fix: drop it; BatchPlanner sets it."
            )
        run = read_run(trainer)
        run.first_batch()  # on every rank: Lightning builds its loader collectively
        optimizer = self.optimizer or run.optimizer_name()  # configure_optimizers, on every rank
        decision = self._decide(run, optimizer) if trainer.is_global_zero else None
        decision = trainer.strategy.broadcast(decision, src=0)
        if isinstance(decision, BaseException):
            raise decision
        self.result = decision
        if (lightning_getattr(pl_module, self.batch_size_attr), trainer.accumulate_grad_batches) != (
            decision["micro_batch_size"], decision["accumulate_grad_batches"]
        ):
            lightning_setattr(pl_module, self.batch_size_attr, decision["micro_batch_size"])
            trainer.accumulate_grad_batches = decision["accumulate_grad_batches"]
            run.batch_changed()  # the loader (and an LR schedule sized by the steps) are built again, with it
        rank_zero_info(self._table())
        for logger in trainer.loggers:
            logger.log_hyperparams({f"batch_planner/{k}": v for k, v in decision.items()})

    def _decide(self, run: RunReader, optimizer: str | None) -> Any:
        """Rank zero's plan, or the exception to raise on every rank (so that no rank waits forever)."""
        try:
            return self._search(run, optimizer)
        except Exception as err:  # sent to every rank, raised there
            return err

    def _search(self, run: RunReader, optimizer: str | None) -> dict[str, Any]:
        from lightning_memopt.planning.estimate import estimate_memory
        from lightning_memopt.planning.plan import largest_fitting

        shape = run.batch_shape()
        if shape is None or (shape[1] is None and self.seq_len is None):
            raise MisconfigurationException(
                "Expected training batches of shape (batch, seq_len, ...) to read seq_len from, got"
                f" {shape}. Fix: pass BatchPlanner(seq_len=...) and a training dataloader."
            )
        seq_len = self.seq_len or shape[1]
        if shape[1] is not None and seq_len != shape[1]:
            raise MisconfigurationException(
                f"Expected BatchPlanner(seq_len=...) to match the training batches' length ({shape[1]}), got"
                f" {seq_len}. Fix: drop seq_len (it is read from the batches) or change the dataloader."
            )
        if optimizer is None:
            raise MisconfigurationException("Expected to read the optimizer from configure_optimizers, could not."
                                            " Fix: pass BatchPlanner(optimizer='adamw').")  # fmt: skip
        kwargs = run.estimate_kwargs((1, shape[1]), optimizer)
        kwargs.update(model=run.pl_module, example_batch=run.first_batch())
        world = kwargs["world_size"]
        budget = int(self.device_memory * (1.0 - self.margin))
        cap = max(1, math.ceil(self.global_batch_tokens / (seq_len * world)))  # no accumulation needed beyond it
        estimates: dict[int, Any] = {}

        def estimate(micro: int) -> Any:
            # with the accumulation this micro-batch needs: accumulating keeps gradients between micro-steps
            if micro not in estimates:
                accumulate = math.ceil(self.global_batch_tokens / (micro * seq_len * world))
                with lightning_step(run.pl_module):
                    change = {"micro_batch_size": micro, "accumulate_grad_batches": accumulate}
                    estimates[micro] = estimate_memory(**{**kwargs, **change})
            return estimates[micro]

        largest, _, at_one = largest_fitting(estimate, budget, cap)
        if largest == 0:
            raise MisconfigurationException(
                f"Expected micro-batch 1 to fit in {format_bytes(budget)}, got a predicted peak of"
                f" {format_bytes(at_one)} at seq_len {seq_len}. Fix: add MemoryMonitor(device_memory=...) to see the"
                " suggestions, or use lightning_memopt.planning.plan_batch to choose ZeRO and checkpointing."
            )
        accumulate = math.ceil(self.global_batch_tokens / (largest * seq_len * world))
        micro = math.ceil(self.global_batch_tokens / (accumulate * seq_len * world))  # same steps, least overshoot
        return {
            "micro_batch_size": micro,
            "max_micro_batch_size": largest,
            "accumulate_grad_batches": accumulate,
            "global_batch_tokens": self.global_batch_tokens,
            "achieved_global_batch_tokens": micro * seq_len * accumulate * world,
            "seq_len": seq_len,
            "world_size": world,
            "budget_bytes": budget,
            "predicted_peak_bytes": estimate(micro).total,
            "next_predicted_peak_bytes": estimate(largest + 1).total,
        }

    def _table(self) -> str:
        r = self.result
        capped = (
            " (capped: no accumulation needed)" if r["next_predicted_peak_bytes"] <= r["budget_bytes"] else ""
        )
        rows = [
            ("micro-batch (largest that fits)", f"{r['max_micro_batch_size']}{capped}"),
            ("micro-batch (used)", str(r["micro_batch_size"])),
            ("accumulate_grad_batches", str(r["accumulate_grad_batches"])),
            ("world size x seq len", f"{r['world_size']} x {r['seq_len']}"),
            ("global batch (requested / achieved)",
             f"{r['global_batch_tokens']:,} / {r['achieved_global_batch_tokens']:,} tokens"),
            ("predicted peak per rank", format_bytes(r["predicted_peak_bytes"], "MiB")),
            (f"predicted at micro-batch {r['max_micro_batch_size'] + 1}",
             format_bytes(r["next_predicted_peak_bytes"], "MiB")),
            ("budget (device - margin)", f"{format_bytes(r['budget_bytes'], 'MiB')} ({self.margin:.0%} kept free)"),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        return "BatchPlanner:\n" + "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
