"""Accuracy of ``estimate_memory`` against real Lightning runs on CPU: single device, and ``MemOptStrategy`` ZeRO 0-3
on 2 (or 4) ranks.

Kinds (``benchmarks/accuracy_kinds.py``): Llama, Qwen2 (tied), plain PyTorch, T5 (encoder-decoder), BERT (masked
LM), Mixtral (top-2 MoE), ViT, a CNN with BatchNorm, PEFT LoRA on a Llama, a partly frozen Llama and GPT-NeoX
(parallel residual); x {single device, ZeRO 0, 1, 2, 3} x {fp32, bf16-mixed} x {eager, SDPA} (not for the CNN) x
checkpointing off/on (the blocks of every kind, the CNN's convolution blocks included). Further axes, by flag (their
defaults keep the matrix above): gradient accumulation (``--accumulate 1,2``: Lightning's ``accumulate_grad_batches``),
offload (``--offload none,optimizer,optimizer+parameters``: ``MemOptStrategy(offload_optimizer="cpu")`` at ZeRO >= 1,
with ``offload_parameters="cpu"`` at ZeRO 3; other stages take ``none`` only) and the ZeRO runs' world size
(``--world-sizes 2,4``). fp16 (``16-mixed``, loss scaling) is a value of ``--precisions`` that does not train on CPU:
its configurations are listed as skipped with the reason the real component gives (``MemOptStrategy`` refuses it;
Lightning's single-device Trainer swaps in bf16), never run.

Measuring: every process counts every CPU allocation with the counting allocator
(:class:`~lightning_memopt.measuring.memory.DeviceMemoryProbe` ``cpu_mode="allocator"``, started before any model is
built, kernel workspaces included): the judge, code the predictor does not share. Beside it the live tensor storages
(``cpu_mode="dispatch"``) explain a gap (``scratch``), never judge. The claim is ``benchmarks/accuracy_targets.py``.
The baseline of a configuration is taken right before its LightningModule is built (after ``collect_garbage()``), so
the model, DeepSpeed's flat buffers, fp32 partitions, Adam states, buckets, activations and the batch are all in the
measured bytes. A callback resets the peak at ``on_train_batch_start`` and reads it at ``on_train_batch_end``;
"measured" is the highest per-step peak of the steady state, steps 2..N (Adam states are created at step 1).
Single-device runs (Lightning's single-device strategy, bf16-mixed = autocast, checkpointing by the
``ActivationCheckpointing`` callback) run first in the main process; then each world size other than 2 runs in a
launch of its own (this script re-run in a subprocess with ``--launch N``, whose Lightning starts ranks 1..N-1);
then one 2-process launch holds every 2-rank ``MemOptStrategy`` configuration (Lightning starts the second process
at the first 2-device fit; later Trainers find the process group up). With gradient accumulation the recorder reads
one peak per micro-batch; a step's peak is the highest of its window's micro-steps and the first window is left out.

Predicting: before anything is measured, in a clean process (a ZeRO-3 engine leaves DeepSpeed's Linear patched in
process-wide), each configuration is predicted on a freshly built copy of its model with the settings
``MemoryMonitor`` reads (``strategy_settings`` with the strategy's own ``"auto"`` bucket sizes, world size,
precision, optimizer, the batch's shape) and the configuration's checkpointing:

* ``module``: ``estimate_memory(module, example_batch=the run's first batch, ...)``;
* ``config``: ``estimate_memory(config.json dict, micro_batch_size=..., seq_len=..., attention=..., ...)`` for the
  kinds whose LightningModule is the Hugging Face model and its loss (LoRA through ``lora_rank``/``lora_targets``).

In ``on_train_start`` every run's own settings (``run_settings``, the checkpointing and attention read from the
module) are compared with the predicted ones (``settings_match``). A rank is compared with its own prediction
(``details["per_rank_total"]`` at ZeRO 1-2); on this CPU device the prediction compared is ``total + cpu_offloaded``
(the offloaded states live in the same memory, as ``MemoryMonitor`` compares them); error = (predicted - measured) /
measured. A prediction that raises a
clear ``ValueError``/``TypeError`` is a refusal, any other exception a crash; both count as failed.

Usage::

    python benchmarks/predictor_accuracy.py --out accuracy.json          # 412 configurations run, 210 fp16 skipped
    python benchmarks/predictor_accuracy.py --kinds t5,vit --stages single,3
    python benchmarks/predictor_accuracy.py --kinds llama --stages 1,2,3 --world-sizes 4 --accumulate 2 \\
        --offload none,optimizer,optimizer+parameters
    python benchmarks/predictor_accuracy.py --quick                      # 20 configurations, every kind and axis
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_memopt.measuring.memory import collect_garbage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_kinds import (
    CONFIG_ONLY,
    KINDS,
    LORA_RANK,
    LORA_TARGETS,
    NO_ATTENTION,
    UNTRAINABLE,
    build_module,
    dataloader,
    first_batch,
    hf_config,
)
from accuracy_report import (
    describe,
    failed_runs,
    predictor_fingerprint,
    print_report,
    rows_of,
    settings_diff,
    summary,
    verdict,
)

STAGES = ("single", "0", "1", "2", "3")
#: ``16-mixed`` (fp16 with loss scaling) does not train on CPU: its configurations are recorded as skipped, with the
#: reason the real component gives (:func:`skip_reason`)
PRECISIONS = ("bf16-mixed", "32-true", "16-mixed")
ATTENTIONS = ("eager", "sdpa")
#: what ``MemOptStrategy`` offloads to the CPU: ``optimizer`` (``offload_optimizer="cpu"``, ZeRO >= 1) and
#: ``optimizer+parameters`` (with ``offload_parameters="cpu"``, ZeRO 3 only)
OFFLOADS = ("none", "optimizer", "optimizer+parameters")
#: world sizes of the ZeRO configurations: 2 runs in the main process's launch, each other one in a launch of its own
WORLD_SIZES = ("2", "4")
METHODS = ("module", "config")
#: the new axes' defaults (a 5-tuple of ``QUICK`` or of the matrix takes them): accumulation, offload, world size
DEFAULT_AXES = (1, "none", 2)
#: ``--quick``: every kind, every strategy, precision, attention and checkpointing setting at least once.
QUICK = (
    ("llama", "0", "32-true", "eager", False),
    ("qwen2", "1", "bf16-mixed", "sdpa", True),
    ("plain", "3", "bf16-mixed", "sdpa", False),  # nn.MultiheadAttention's packed projection, saved as views
    ("t5", "3", "bf16-mixed", "eager", False),  # the config path switches the attention of T5's stacks too
    ("bert", "2", "bf16-mixed", "sdpa", False),
    ("mixtral", "1", "bf16-mixed", "eager", False),
    ("vit", "3", "32-true", "eager", True),
    ("cnn", "single", "bf16-mixed", None, True),
    ("lora", "3", "bf16-mixed", "sdpa", True),  # frozen base weights recomputed inside a trainable block
    ("frozen", "3", "32-true", "sdpa", True),
    ("neox", "2", "32-true", "eager", False),
    ("llama", "single", "bf16-mixed", "sdpa", True),
    ("plain", "single", "32-true", "eager", True),
    ("plain", "3", "32-true", "sdpa", True),  # a recomputed block keeps a released weight's gathered copy
    ("vit", "2", "32-true", "sdpa", True),  # rank 0's grads_in_partition: buckets in the traced gradient order
    # (..., accumulate_grad_batches, offload, world size)
    ("llama", "2", "bf16-mixed", "sdpa", False, 2, "none", 2),  # gradients held between micro-steps
    ("llama", "1", "32-true", "eager", False, 1, "optimizer", 2),  # fp32 partitions and Adam states on the host
    ("llama", "3", "32-true", "sdpa", False, 1, "optimizer+parameters", 2),
    ("llama", "1", "16-mixed", "sdpa", False),  # recorded as skipped: fp16 needs a GPU
    ("llama", "1", "bf16-mixed", "sdpa", False, 1, "none", 4),  # a 4-process launch of its own
)


# ---------------------------------------------------------------- the Lightning glue (one place for its imports)
def strategy_of(cfg: dict) -> Any:
    """The configuration's strategy: Lightning's single-device one, or ``MemOptStrategy`` at its ZeRO stage."""
    if cfg["stage"] == "single":
        from lightning.pytorch.strategies import SingleDeviceStrategy

        return SingleDeviceStrategy(torch.device("cpu"))
    from lightning_memopt import MemOptStrategy

    offload = cfg.get("offload", "none")
    return MemOptStrategy(zero=int(cfg["stage"]), activation_checkpointing=cfg["checkpointing"],
                          offload_optimizer="cpu" if "optimizer" in offload else False,
                          offload_parameters="cpu" if "parameters" in offload else False)  # fmt: skip


def planned_settings(cfg: dict, module: pl.LightningModule, batch: Any) -> dict:
    """``estimate_memory``'s settings of a configuration before its run, read as ``MemoryMonitor`` reads them in
    setup (the strategy's ``"auto"`` bucket sizes resolved by the strategy's own rule on the module), with the
    configuration's checkpointing (applied by the strategy or the callback during setup)."""
    from lightning_memopt.lightning._run_reader import batch_shape, optimizer_name, strategy_settings

    micro, seq = batch_shape(batch)
    settings = strategy_settings(strategy_of(cfg), module)
    settings.update(world_size=cfg["world_size"], precision=cfg["precision"],
                    optimizer=optimizer_name(module.configure_optimizers()), micro_batch_size=micro,
                    accumulate_grad_batches=cfg["accumulate"],
                    activation_checkpointing=cfg["checkpointing"])  # fmt: skip
    return settings if seq is None else {**settings, "seq_len": seq}


def read_run_settings(trainer: pl.Trainer, module: pl.LightningModule, batch: Any) -> dict:
    """The settings of a running fit (``run_settings``), with the checkpointing and attention read from the module."""
    from lightning_memopt.core.blocks import checkpoint_flags
    from lightning_memopt.lightning._run_reader import RunReader, batch_shape, optimizer_name

    settings = RunReader(trainer).estimate_kwargs(batch_shape(batch), optimizer_name(trainer.optimizers[0]))
    flags = checkpoint_flags(module, None)
    checkpointed = sum(flags)
    all_or_none = checkpointed in (0, len(flags))
    settings["activation_checkpointing"] = checkpointed == len(flags) if all_or_none else checkpointed
    settings["attention"] = module_attention(module)
    return settings


def module_attention(module: torch.nn.Module) -> "str | None":
    """The attention a module runs: its Hugging Face config's, the plain model's own setting, else ``None``."""
    for sub in module.modules():
        implementation = getattr(getattr(sub, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str):
            return implementation
        if isinstance(getattr(sub, "attention", None), str):
            return sub.attention
    return None


def checkpoint_callbacks(cfg: dict) -> list:
    """Single device: checkpointing as a user of another strategy applies it (``MemOptStrategy`` does it itself)."""
    if cfg["stage"] != "single" or not cfg["checkpointing"]:
        return []
    from lightning_memopt import ActivationCheckpointing

    return [ActivationCheckpointing()]


# ---------------------------------------------------------------- predicting
def predict(cfg: dict) -> dict:
    """Both methods' prediction of every rank of a configuration, on a freshly built copy of its model."""
    from lightning_memopt import estimate_memory
    from lightning_memopt.lightning._run_reader import lightning_step

    module, batch = build_module(cfg), first_batch(cfg)
    settings = planned_settings(cfg, module, batch)
    calls = {"module": lambda: estimate_memory(module, example_batch=batch, **settings)}
    if cfg["kind"] in CONFIG_ONLY:
        extra = {"lora_rank": LORA_RANK, "lora_targets": list(LORA_TARGETS)} if cfg["kind"] == "lora" else {}
        config_settings = {**settings, "attention": cfg["attention"], **extra}
        if cfg["kind"] == "vit":
            config_settings.pop("seq_len", None)  # an image model's tokens come from its config
        config = hf_config(cfg["kind"], cfg["hidden"], cfg["layers"])
        calls["config"] = lambda: estimate_memory(config, **config_settings)
    out: dict = {"settings": {**settings, "attention": cfg["attention"]}}
    for method, call in calls.items():
        start = time.perf_counter()
        try:
            with lightning_step(module):
                est = call()
        except (ValueError, TypeError) as err:  # a clear refusal: reported as failed
            out[method] = {"failed": "refusal", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            continue
        except Exception as err:
            where = traceback.extract_tb(err.__traceback__)[-1]
            out[method] = {"failed": "crash", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                                                      f" ({Path(where.filename).name}:{where.lineno})"}  # fmt: skip
            continue
        # on a CPU device the offloaded states live in the same memory (as MemoryMonitor compares them)
        per_rank, host = est.details.get("per_rank_total") or {}, est.cpu_offloaded
        out[method] = {"total": est.total + host, "per_rank": {int(r): int(v) + host for r, v in per_rank.items()},
                       "cpu_offloaded": host,
                       "peak_phase": est.details.get("peak_phase"), "seconds": time.perf_counter() - start}  # fmt: skip
    return out


# ---------------------------------------------------------------- measuring
class StepRecorder(pl.Callback):
    """Per training step: the peak bytes of each probe (relative to its ``base``); at train start: the settings.

    ``probes``: ``{"allocations": every allocation (the judge), "tensors": live tensor storages (the explanation)}``.
    """

    def __init__(self, probes: "dict[str, Any]", base: "dict[str, int]") -> None:
        self.probes, self.base = probes, base
        self.steps: list[dict[str, int]] = []
        self.settings: dict[str, Any] = {}
        self.after_setup = 0
        self._read = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        if not self._read:  # on_train_start has no batch; read the settings before the first step
            self._read = True
            self.settings = read_run_settings(trainer, pl_module, batch)
            self.after_setup = self.probes["allocations"].current_bytes - self.base["allocations"]
        for probe in self.probes.values():
            probe.start_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = {}
        for name, probe in self.probes.items():
            mem = probe.end_step()
            step[f"{name}_peak"] = mem.peak_bytes - self.base[name]
            step[f"{name}_end"] = mem.current_bytes - self.base[name]
        self.steps.append(step)


def run_config(probes: "dict[str, Any]", cfg: dict) -> dict:
    """Fit one configuration in a fresh Trainer; its memory relative to the bytes alive before the model."""
    loader = dataloader(cfg)  # the samples' source (the text): host data, not the step's
    collect_garbage()
    base = {name: probe.current_bytes for name, probe in probes.items()}
    start = time.perf_counter()
    module = build_module(cfg)
    n_params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    recorder = StepRecorder(probes, base)
    trainer = pl.Trainer(
        accelerator="cpu", devices=cfg["world_size"], num_nodes=1, strategy=strategy_of(cfg),
        precision=cfg["precision"], max_steps=cfg["steps"], accumulate_grad_batches=cfg["accumulate"], logger=False,
        callbacks=[recorder, *checkpoint_callbacks(cfg)], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    try:
        trainer.fit(module, train_dataloaders=loader)
        failed = None
    except Exception as err:
        failed = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    result = {**cfg, "rank": trainer.global_rank, "n_params": n_params, "trainable": trainable, "failed": failed,
              "after_setup": recorder.after_setup, "steps": recorder.steps,
              "run_settings": recorder.settings}  # fmt: skip
    del trainer, module, recorder, loader
    collect_garbage()
    result["leaked"] = probes["allocations"].current_bytes - base["allocations"]
    result["seconds"] = time.perf_counter() - start
    return result


def start_probes() -> "dict[str, Any]":
    """The two counters, started before anything is built (everything after counts).

    The counting allocator sees every allocation, kernel workspaces included (oneDNN's bf16 matmuls on CPU take some
    0.1-0.4 MB of scratch inside one op): it is the judge, code the predictor does not share. Live tensor storages (a
    dispatch mode, active in the thread that trains) count what the predictor models and explain a gap."""
    from lightning_memopt.measuring.memory import DeviceMemoryProbe

    probes = {"tensors": DeviceMemoryProbe("cpu", cpu_mode="dispatch"),
              "allocations": DeviceMemoryProbe("cpu", cpu_mode="allocator")}  # fmt: skip
    for probe in probes.values():
        probe.start()
    return probes


def rank_main(configs: list[dict], out_dir: Path, probes: "dict[str, Any] | None" = None) -> None:
    """The runs of one launch (its other ranks are started by Lightning at the first fit and re-run this script)."""
    probes = probes or start_probes()
    results = [run_config(probes, cfg) for cfg in configs]
    Path(out_dir, f"rank{results[0]['rank']}.json").write_text(json.dumps(results, default=str))
    torch.distributed.barrier()
    for probe in probes.values():
        probe.close()


def read_ranks(work: Path, world_size: int) -> list[dict]:
    """The results every rank of a launch wrote to ``work`` (the folder is removed)."""
    results = []
    for rank in range(world_size):
        path = Path(work, f"rank{rank}.json")
        if not path.exists():
            raise SystemExit(f"Expected {path} from rank {rank} of the {world_size}-rank launch, got none. Fix: read"
                             " the launch's output above for the rank's error.")  # fmt: skip
        results += json.loads(path.read_text())
        path.unlink()
    work.rmdir()
    return results


#: environment variables of a live launch: a separate launch must pick its own port and ranks
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
               "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")  # fmt: skip


def separate_launch(world_size: int, argv: list[str]) -> list[dict]:
    """The ZeRO configurations of one world size other than 2, in a launch of their own: this script re-run in a
    subprocess with ``--launch N`` (its rank 0; Lightning starts ranks 1..N-1 at its first fit), so the main
    process's 2-rank process group is left as it is."""
    work = Path(tempfile.mkdtemp(prefix=f"predictor_accuracy_{world_size}ranks_"))
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--launch", str(world_size), "--work-dir",
               str(work)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"Expected the {world_size}-rank launch to exit with 0, got {proc.returncode}. Fix: read its"
                         f" output above; rerun it alone with {shlex.join(command)}")  # fmt: skip
    return read_ranks(work, world_size)


# ---------------------------------------------------------------- the matrix
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"among {','.join(KINDS)}")
    parser.add_argument("--stages", default=",".join(STAGES), help="'single' (one device) and ZeRO stages 0-3")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="16-mixed is recorded as skipped on CPU")
    parser.add_argument("--attention", default=",".join(ATTENTIONS))
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--accumulate", default="1", help="Lightning's accumulate_grad_batches values, e.g. 1,2")
    parser.add_argument("--offload", default="none", help=f"among {','.join(OFFLOADS)} (offload: ZeRO >= 1; parameters:"
                        " ZeRO 3; other stages take 'none' only)")  # fmt: skip
    parser.add_argument("--world-sizes", default="2", help=f"ranks of the ZeRO runs, among {','.join(WORLD_SIZES)}"
                        " (2: the main process's launch; each other one a launch of its own)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help=f"only the {len(QUICK)} configurations of QUICK, 3 steps")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (steady: 2..N)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the summary as JSON")
    parser.add_argument("--work-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--launch", type=int, default=None, help=argparse.SUPPRESS)  # rank 0 of a separate launch
    return parser.parse_args(argv)


def _axis(text: str, allowed: "tuple[str, ...]", name: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"Expected --{name} among {','.join(allowed)}, got {text!r}. Fix: e.g. --{name} {allowed[0]}")
    return values


def _counts(text: str, name: str) -> list[int]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise SystemExit(f"Expected --{name} as positive integers, got {text!r}. Fix: e.g. --{name} 1,2")
    return [int(v) for v in values]


def offload_applies(stage: str, offload: str) -> bool:
    """Whether ``MemOptStrategy`` offers the offload at the stage (optimizer: ZeRO >= 1; parameters: ZeRO 3)."""
    if offload == "none":
        return True
    return stage in ("1", "2", "3") if offload == "optimizer" else stage == "3"


def configurations(args: argparse.Namespace) -> list[dict]:
    """The matrix (or ``QUICK``), single-device configurations first (they run before any launch).

    A configuration of a precision the CPU cannot train (``16-mixed``) stays in the list with ``runs_on_cpu`` False:
    it is recorded as skipped with the reason (:func:`skip_reason`), never run nor predicted.
    """
    common = {"hidden": args.hidden, "layers": args.layers, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "steps": 3 if args.quick and args.steps == 4 else args.steps}  # fmt: skip
    if args.quick:
        axes = [(*a, *DEFAULT_AXES[len(a) - 5 :]) for a in QUICK]
    else:
        attentions = _axis(args.attention, ATTENTIONS, "attention")
        world_sizes = [int(w) for w in _axis(args.world_sizes, WORLD_SIZES, "world-sizes")]
        axes = []
        for kind, stage, precision, ckpt, accumulate, offload, world_size in itertools.product(
            _axis(args.kinds, KINDS, "kinds"), _axis(args.stages, STAGES, "stages"),
            _axis(args.precisions, PRECISIONS, "precisions"), _axis(args.checkpointing, ("off", "on"), "checkpointing"),
            _counts(args.accumulate, "accumulate"), _axis(args.offload, OFFLOADS, "offload"), world_sizes,
        ):  # fmt: skip
            if not offload_applies(stage, offload) or (stage == "single" and world_size != world_sizes[0]):
                continue
            axes += [(kind, stage, precision, attention, ckpt == "on", accumulate, offload, world_size)
                     for attention in ([None] if kind in NO_ATTENTION else attentions)]  # fmt: skip
    axes = [a for a in axes if untrainable(a[0], a[1], a[2]) is None]
    axes.sort(key=lambda a: a[1] != "single")
    return [{"index": i, "kind": kind, "stage": stage, "world_size": 1 if stage == "single" else world_size,
             "precision": precision, "attention": attention, "checkpointing": ckpt, "accumulate": accumulate,
             "offload": offload, "runs_on_cpu": precision not in CPU_UNSUPPORTED, **common}
            for i, (kind, stage, precision, attention, ckpt, accumulate, offload, world_size)
            in enumerate(axes)]  # fmt: skip


#: precisions that do not train on a CPU device (fp16 and its loss scaling need a GPU)
CPU_UNSUPPORTED = ("16-mixed",)


def untrainable(kind: str, stage: str, precision: str) -> "str | None":
    """Why a kind does not train with this strategy and precision here (``None``: it trains)."""
    return UNTRAINABLE.get((kind, "single" if stage == "single" else "zero", precision))


def skip_reason(cfg: dict) -> str:
    """Why a configuration of :data:`CPU_UNSUPPORTED` is not run, in the words of the component that would run it:
    ``MemOptStrategy``'s refusal on CPU, or what Lightning's single-device Trainer makes of it (it swaps in bf16)."""
    if cfg["stage"] != "single":
        from lightning_memopt.lightning.strategies.setup_config import check_cpu_precision

        try:
            check_cpu_precision(cfg["precision"])
        except Exception as err:  # MisconfigurationException
            return f"MemOptStrategy refuses it on CPU: {str(err).splitlines()[0]}"
        return "MemOptStrategy accepts it on CPU, but the matrix does not run it"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(accelerator="cpu", devices=1, precision=cfg["precision"], logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)  # fmt: skip
    said = [str(w.message).splitlines()[0] for w in caught if "16" in str(w.message)]
    return (
        f"Lightning's Trainer(accelerator='cpu', precision={cfg['precision']!r}) trains in"
        f" {trainer.precision!r}, not fp16{': ' + said[0] if said else ''}"
    )


def main(argv: "list[str] | None" = None) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configs = configurations(args)
    runs = [cfg for cfg in configs if cfg["runs_on_cpu"]]
    distributed = [cfg for cfg in runs if cfg["stage"] != "single"]
    if args.launch or "LOCAL_RANK" in os.environ:  # a rank of a launch (this script re-run), with the same argv
        world_size = args.launch or 2
        rank_main([cfg for cfg in distributed if cfg["world_size"] == world_size], args.work_dir)
        return
    if not configs:
        raise SystemExit("Expected at least one configuration that trains, got none. Fix: widen the axis filters.")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *argv])
    skipped = [{**cfg, "reason": skip_reason(cfg)} for cfg in configs if not cfg["runs_on_cpu"]]
    start = time.perf_counter()
    predictions = {cfg["index"]: predict(cfg) for cfg in runs}
    predicting = time.perf_counter() - start
    probes = start_probes()
    results = [run_config(probes, cfg) for cfg in runs if cfg["stage"] == "single"]
    for world_size in sorted({cfg["world_size"] for cfg in distributed} - {2}):
        results += separate_launch(world_size, argv)
    if any(cfg["world_size"] == 2 for cfg in distributed):
        work = Path(tempfile.mkdtemp(prefix="predictor_accuracy_"))
        sys.argv += ["--work-dir", str(work)]  # rank 1 re-runs this script with sys.argv
        rank_main([cfg for cfg in distributed if cfg["world_size"] == 2], work, probes)
        results += read_ranks(work, 2)
    else:
        for probe in probes.values():
            probe.close()
    for r in results:
        r["settings_diff"] = settings_diff(predictions[r["index"]]["settings"], r["run_settings"])
        r["settings_match"] = not r["settings_diff"]
    rows = rows_of(sorted(results, key=lambda r: (r["index"], r["rank"])), predictions, METHODS)
    summ = summary(rows, METHODS, KINDS)
    seconds = time.perf_counter() - start
    verdicts = verdict(rows, METHODS)
    print_report(rows, summ, verdicts, METHODS)
    mismatched = [describe(r) for r in rows if not r["run_failed"] and not r["settings_match"]]
    failures = failed_runs(rows)
    print(f"Runs that failed: {len(failures)}" + "".join(f"\n  {f}" for f in failures))
    for cfg in skipped:
        print(f"Skipped: {describe(cfg)}: {cfg['reason'].rstrip('.')}.")
    left_out = {k: v for k, v in UNTRAINABLE.items() if k[0] in {cfg["kind"] for cfg in configs}}
    for (kind, strategy, precision), reason in left_out.items():
        print(f"Left out: {kind} with {'MemOptStrategy' if strategy == 'zero' else strategy} {precision}: {reason}.")
    launches = sorted({cfg["world_size"] for cfg in distributed})
    print(f"\n{len(configs)} configurations ({len(runs) - len(distributed)} single device, {len(distributed)} ZeRO in"
          f" {len(launches)} launch(es) of {','.join(map(str, launches)) or '-'} ranks, {len(skipped)} skipped),"
          f" {len(rows)} measured peaks: {seconds:.0f} s wall (predicting {predicting:.0f} s)."
          f"\nRun settings differ from the predicted ones in {len(mismatched)} rows"
          f"{': ' + ', '.join(mismatched) if mismatched else ''}.\nCommand: {command}")  # fmt: skip
    if args.out:
        result = {"rows": rows, "summary": summ, "verdict": verdicts, "seconds": seconds, "failed_runs": failures,
                  "skipped": skipped, "left_out": [[*k, v] for k, v in left_out.items()],
                  "predicting_seconds": predicting, "configurations": len(configs), "command": command,
                  "torch": torch.__version__, "lightning": pl.__version__,
                  "predictor_sources_sha256": predictor_fingerprint()}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo's threads abort a process that exits with it (pytorch#190489)
