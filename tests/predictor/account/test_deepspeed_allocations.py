"""The synthesized DeepSpeed fit (``predictor/deepspeed_allocations.py``) against a real one: a tiny Llama fitted on
the CPU under MemOptStrategy (world size 1), every storage recorded with its size and the DeepSpeed or torch
function that made it. The engine's allocations must match event for event (order, alloc or free, bytes), and
the live bytes at the end of the initialisation and the steady step's peak must match the real fit's."""

import traceback
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_memopt.predictor.account.deepspeed_allocations import deepspeed_events, live_peak, replay_deepspeed
from lightning_memopt.predictor.precision import resolve_precision
from lightning_memopt.predictor.read.reading import read_model
from lightning_memopt.predictor.trace.step import trace_step
from lightning_memopt.predictor.trace.zero3 import Zero3Settings

#: events smaller than this are left out on both sides (the loss scaler's and the norms' scalars, Lightning's)
SMALL = 1024
STEPS = 3


class _Recorder(TorchDispatchMode):
    """Every CPU storage an op returns: ``("alloc", key, bytes, origin)`` and ``("free", key)`` when it dies;
    ``origin`` is ``"engine"`` (made in DeepSpeed or torch.optim outside the model's autograd), ``"comm"`` (a
    collective on gloo), ``"param"`` (the module's parameters, registered before the fit) or ``"other"``."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        self._live: dict[int, int] = {}
        self._count = 0

    def add(self, t: torch.Tensor, origin: str) -> None:
        st = t.untyped_storage()
        if st._cdata in self._live or st.nbytes() == 0 or t.device.type != "cpu":
            return
        self._count += 1
        self._live[st._cdata] = self._count
        self.events.append(("alloc", self._count, st.nbytes(), origin))
        weakref.finalize(st, self._gone, st._cdata, self._count)

    def _gone(self, cdata: int, key: int) -> None:
        self._live.pop(cdata, None)
        self.events.append(("free", key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        if tensors:
            origin = _origin(traceback.extract_stack(limit=12)[:-1])
            for t in tensors:
                self.add(t, origin)
        return out


def _origin(frames) -> str:
    for f in reversed(frames):
        name = f.filename.replace("\\", "/")
        if "/torch/optim/" in name:
            return "engine"
        if "/torch/" in name or "typing_extensions" in name or "_python_dispatch" in name or "/nvtx" in name:
            continue
        if "/deepspeed/comm/" in name:  # a collective's own copy on the CPU (gloo's reduce-scatter splits its
            return "comm"  # input); NCCL allocates nothing through the caching allocator
        if "/deepspeed/" in name:  # the model's autograd runs inside DeepSpeed's backward, its Linear layers in
            # ZeRO-3's LinearFunctionForZeroStage3: the model's ops (traced), not the engine's
            model = (name.endswith("engine.py") and f.name == "backward") or "zero/linear" in name
            return "other" if model else "engine"
        return "other"
    return "other"


def _module():
    import lightning.pytorch as pl
    import transformers

    class Llama(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                           max_position_embeddings=64)  # fmt: skip
            self.model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return Llama()


def _record_fit(zero: int):
    """The events of a real CPU fit from before DeepSpeed's initialisation, the index where the first batch
    starts and the DeepSpeed config it ran with."""
    import lightning.pytorch as pl

    from lightning_memopt import MemOptStrategy

    torch.manual_seed(0)
    module = _module()
    rec = _Recorder()
    for p in module.parameters():
        rec.add(p, "param")
    starts: list[int] = []

    class Mark(pl.Callback):
        def on_train_batch_start(self, *args):
            starts.append(len(rec.events))

    data = torch.randint(1, 512, (2 * STEPS, 32))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemOptStrategy(zero=zero), precision="bf16-mixed",
                         max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Mark()])  # fmt: skip
    with warnings.catch_warnings(), rec:
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    return module, rec.events, starts, trainer.strategy.config, data[:2]


def _engine(events, origins, sizes=None):
    """(alloc/free, bytes) of the events of ``origins`` at least :data:`SMALL` bytes, in order."""
    size, origin, out = {}, {}, []
    for e in events:
        if e[0] == "alloc":
            size[e[1]] = e[2]
            origin[e[1]] = e[3] if len(e) > 3 else e[1][0]
        if origin[e[1]] in origins and size[e[1]] >= SMALL:
            out.append((e[0], size[e[1]]))
    return out


def _live(events, upto=None):
    """Live bytes after each event (all origins)."""
    size, cur, out = {}, 0, []
    for e in events[:upto]:
        if e[0] == "alloc":
            size[e[1]] = e[2]
            cur += e[2]
        else:
            cur -= size.pop(e[1])
        out.append(cur)
    return out


@pytest.mark.slow  # four CPU fits under DeepSpeed (about 10 s each)
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_the_synthesized_fit_is_the_real_one_event_by_event(zero):
    module, real, starts, config, batch = _record_fit(zero)
    reading = read_model(module)
    precision = resolve_precision("bf16-mixed")
    cfg = config["zero_optimization"]
    zero3 = Zero3Settings(persistence_threshold=int(cfg.get("stage3_param_persistence_threshold", 100_000)),
                          max_reuse_distance=int(cfg.get("stage3_max_reuse_distance", 10**9)),
                          prefetch_bucket_size=int(cfg.get("stage3_prefetch_bucket_size", 5 * 10**7)),
                          max_live_parameters=int(cfg.get("stage3_max_live_parameters", 10**9)),
                          complete_trace=True) if zero == 3 else False  # fmt: skip
    trace = trace_step(module, batch, precision, engine="deepspeed", zero3=zero3, record=True,
                       step=lambda m, b: m.training_step(b, 0))  # fmt: skip
    ours = deepspeed_events(trace, reading, zero=zero, precision=precision, optimizer="adamw",
                            deepspeed_config=config, steps=STEPS, cast_on_device=True)  # fmt: skip

    # the engine's own allocations, event by event, through the initialisation and every step; its frees in their
    # order too, but not interleaved with the allocations: gloo's worker thread lets a collective's tensor go a moment
    # after the collective returns (even on one rank), before or after the main thread's next allocation
    ours_engine, real_engine = _engine(ours, ("param", "ds", "opt")), _engine(real, ("param", "engine"))
    for kind in ("alloc", "free"):
        assert [e for e in ours_engine if e[0] == kind] == [e for e in real_engine if e[0] == kind], kind
    # what the real engine made below SMALL bytes never holds more than a few KiB at once
    small = [e for e in real if e[0] == "alloc" and e[3] == "engine" and e[2] < SMALL]
    assert sum(e[2] for e in small) < 64 * 1024 * STEPS

    # the live bytes when the first batch starts: the engine's states, exactly
    first_step = next(i for i, e in enumerate(ours) if e[1][0] in ("step", "workspace"))
    assert _live(ours, first_step)[-1] == pytest.approx(_live(real, starts[0])[-1], abs=4096)
    # the initialisation's peak
    assert max(_live(ours, first_step)) == pytest.approx(max(_live(real, starts[0])), abs=4096)
    # the steady step's peak (the last step), with the model's own storages as traced
    last = next(i for i, e in enumerate(ours) if e[1][0] == "step" and e[1][1] == STEPS - 1)
    ours_peak = max(_live(ours)[last:])
    real_peak = max(_live(real)[starts[-1] :])
    assert ours_peak == pytest.approx(real_peak, rel=0.03)


def test_a_cuda_replay_of_a_zero2_fit_reserves_what_its_events_map():
    from lightning_memopt.predictor.account.cuda_allocator import simulate
    from lightning_memopt.predictor.account.cuda_replay import allocator_settings
    from lightning_memopt.predictor.device import cuda_rules
    from lightning_memopt.predictor.trace.step import TraceResult

    torch.manual_seed(0)
    reading = read_model(torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)))
    step = TraceResult((0, 0), (0, 0), (0, 0), 0, 0, 0, storages=((0, 1, 2**20, 1),), grad_keys=())
    precision = resolve_precision("bf16-mixed")
    for expandable in (False, True):
        rules = cuda_rules("h100", expandable_segments=expandable)
        events = deepspeed_events(step, reading, zero=2, precision=precision, optimizer="adamw-foreach",
                                  workspace_bytes=rules.workspace_bytes)  # fmt: skip
        sim = replay_deepspeed(events, rules)
        whole = simulate(events, allocator_settings(rules))  # from process start: the initialisation's peak too
        assert whole.peak_allocated >= live_peak(events)[0] and whole.peak_allocated >= sim.peak_allocated
        assert sim.peak_reserved == whole.peak_reserved >= sim.peak_allocated


def test_the_arguments_are_checked():
    from lightning_memopt.predictor.read.reading import from_count
    from lightning_memopt.predictor.trace.step import TraceResult

    step = TraceResult((0,), (0,), (0,), 0, 0, 0)
    reading = read_model(torch.nn.Linear(4, 4))
    precision = resolve_precision("bf16-mixed")
    with pytest.raises(ValueError, match="Expected `zero`"):
        deepspeed_events(step, reading, zero=4, precision=precision, optimizer="adamw")
    with pytest.raises(ValueError, match="Expected `steps` >= 1"):
        deepspeed_events(step, reading, zero=2, precision=precision, optimizer="adamw", steps=0)
    with pytest.raises(ValueError, match="Fix: read the module"):
        deepspeed_events(step, from_count(1e6), zero=2, precision=precision, optimizer="adamw")
