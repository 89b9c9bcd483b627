"""The fused linear cross-entropy under DeepSpeed ZeRO-3, 2 CPU ranks (gloo): the lm_head weight is gathered.

Checkpointing under ZeRO-3 through MemOptStrategy is covered by tests/lightning/strategies/test_memopt_distributed.py;
set ``MEMOPT_RUN_DISTRIBUTED=1`` to also run this file's raw-DeepSpeed checkpointing case (about 30 s more).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


class _Wrap(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.lm, self.mode = lm, mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from lightning_memopt.transforms import fused_linear_cross_entropy

        if self.mode != "flce":
            return self.lm(input_ids=ids, labels=ids, use_cache=False).loss
        hidden = self.lm.model(input_ids=ids, use_cache=False).last_hidden_state
        return fused_linear_cross_entropy(hidden[:, :-1], self.lm.lm_head.weight, ids[:, 1:])


def _run(rank: int, port: int, mode: str, queue) -> None:
    import importlib.util
    import logging
    import pathlib

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    import deepspeed

    from lightning_memopt.transforms import apply_activation_checkpointing

    spec = importlib.util.spec_from_file_location("_models", pathlib.Path(__file__).with_name("_models.py"))
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    model = _Wrap(models.hf_model("llama", layers=2), mode)
    if mode == "ckpt":
        apply_activation_checkpointing(model)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {
            "stage": 3,
            "param_persistence_threshold": 0,
            "reduce_bucket_size": 1e4,
            "stage3_prefetch_bucket_size": 1e4,
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    torch.manual_seed(1 + rank)
    losses = []
    for _ in range(3):
        loss = engine(torch.randint(0, 256, (2, 32)))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    queue.put((rank, losses))


def _losses(mode: str) -> dict[int, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_run, args=(rank, port, mode, queue)) for rank in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return dict(queue.get() for _ in processes)


@pytest.mark.slow  # three 2-process ZeRO-3 fits (28 s)
def test_checkpointing_and_fused_loss_train_like_plain_zero3():
    reference = _losses("plain")
    for mode in ("ckpt", "flce") if os.environ.get("MEMOPT_RUN_DISTRIBUTED") else ("flce",):
        got = _losses(mode)
        for rank in (0, 1):
            assert got[rank] == pytest.approx(reference[rank], rel=1e-4), (mode, rank)
