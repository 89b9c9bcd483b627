"""Accuracy of ``estimate_memory`` against real ``MemOptStrategy`` runs: Lightning, DeepSpeed ZeRO 0-3, CPU, 2 ranks.

One ``Trainer(accelerator="cpu", devices=2, strategy=MemOptStrategy(zero=k, activation_checkpointing=c))`` per
configuration, all of them in one 2-process launch (Lightning starts the second process at the first fit; every
later Trainer finds the process group already up). Each rank counts its live CPU tensor bytes with
:class:`~lightning_memopt.utilities.memory.DeviceMemoryProbe` (the counting allocator, installed at process start,
before anything is built). For every configuration the baseline is taken right before the LightningModule is built
(after ``gc.collect()``), so the model built before ``fit``, DeepSpeed's flat buffers, fp32 partitions, Adam states,
activations and buckets are all in the measured bytes. A callback resets the peak at ``on_train_batch_start`` and
reads it at ``on_train_batch_end`` (forward, backward and optimizer step); "measured" is the highest per-step peak
of the steady state, steps 2..N (Adam states are created at step 1).

Before the first fit, rank 0 predicts every configuration in a clean process, on a freshly built copy of its
model: ``method="analytic"`` on its spec and ``method="trace"`` on the module with one real batch, with the settings
``MemoryMonitor`` reads in its ``setup`` (``strategy_settings``: ZeRO stage, the DeepSpeed config with the strategy's
own ``"auto"`` bucket sizes; world size, precision, optimizer, checkpointing, and the attention the model was built
with). In ``on_train_start`` every run's own settings (``run_settings``) are compared with those
(``settings_match``). A rank is compared with its own prediction (``details["per_rank_total"]`` at ZeRO 1-2, else
``total``); error = (predicted - measured) / measured. A prediction that raises is reported as failed.

Models (random weights, nothing downloaded): ``CausalLM`` of ``examples/tiny_llm.py`` as Llama (GQA 4/2) and Qwen2
(GQA 4/2, tied embeddings), and ``PlainLM`` of ``examples/plain_transformer.py`` (plain PyTorch:
``nn.MultiheadAttention``, ``nn.RMSNorm``, GELU MLP; "eager" returns the attention weights, "sdpa" does not, which
makes PyTorch call ``scaled_dot_product_attention``). Data: byte windows of the shipped text (``TextDataModule``).

Usage::

    python benchmarks/predictor_accuracy.py --out accuracy.json            # 96 configurations x 2 ranks
    python benchmarks/predictor_accuracy.py --families llama --stages 0,3
    python benchmarks/predictor_accuracy.py --quick                        # 4 configurations covering every axis
"""

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

FAMILIES = ("llama", "qwen2", "plain")
PRECISIONS = ("bf16-mixed", "32-true")
ATTENTIONS = ("eager", "sdpa")
#: ``--quick``: one configuration per ZeRO stage, together covering every family, precision, attention and
#: checkpointing setting.
QUICK = (
    ("llama", 0, "32-true", "eager", False),
    ("qwen2", 1, "bf16-mixed", "sdpa", True),
    ("plain", 2, "bf16-mixed", "eager", True),
    ("llama", 3, "bf16-mixed", "sdpa", False),
)


def build_module(cfg: dict) -> pl.LightningModule:
    """The configuration's LightningModule, random weights from seed 0."""
    torch.manual_seed(0)
    if cfg["family"] == "plain":
        from plain_transformer import PlainLM

        return PlainLM(hidden=cfg["hidden"], layers=cfg["layers"], attention=cfg["attention"])
    from tiny_llm import CausalLM

    return CausalLM(family=cfg["family"], hidden_size=cfg["hidden"], num_layers=cfg["layers"],
                    attn_implementation=cfg["attention"])  # fmt: skip


class StepRecorder(pl.Callback):
    """Per training step: the peak bytes of each probe (relative to its ``base``); at train start: the settings.

    ``probes``: ``{"tensors": live tensor storages (the issue's measure), "allocations": every allocation}``.
    """

    def __init__(self, probes: "dict[str, Any]", base: "dict[str, int]", cfg: dict) -> None:
        self.probes, self.base, self.cfg = probes, base, cfg
        self.steps: list[dict[str, int]] = []
        self.settings: dict[str, Any] = {}
        self.after_setup = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_memopt.callbacks._run_settings import optimizer_name, run_settings

        shape = (self.cfg["micro_batch"], self.cfg["seq_len"])
        settings = run_settings(trainer, pl_module, shape, optimizer_name(trainer.optimizers[0]))
        settings["read_attention"] = settings.get("attention")
        settings["attention"] = self.cfg["attention"]  # a plain module has no config to read it from
        self.settings = copy.deepcopy(settings)
        self.after_setup = self.probes["tensors"].current_bytes - self.base["tensors"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
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
    from tiny_llm import TextDataModule

    from lightning_memopt import MemOptStrategy

    data = TextDataModule(batch_size=cfg["micro_batch"], seq_len=cfg["seq_len"])  # the text: host data, not the step's
    gc.collect()
    base = {name: probe.current_bytes for name, probe in probes.items()}
    start = time.perf_counter()
    module = build_module(cfg)
    n_params = sum(p.numel() for p in module.parameters())
    recorder = StepRecorder(probes, base, cfg)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, num_nodes=1,
        strategy=MemOptStrategy(zero=cfg["zero"], activation_checkpointing=cfg["checkpointing"]),
        precision=cfg["precision"], max_steps=cfg["steps"], accumulate_grad_batches=1, logger=False,
        callbacks=[recorder], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    rank = trainer.global_rank
    result = {**cfg, "rank": rank, "n_params": n_params, "after_setup": recorder.after_setup,
              "steps": recorder.steps, "settings": recorder.settings}  # fmt: skip
    del trainer, module, recorder, data
    gc.collect()
    result["leaked"] = probes["tensors"].current_bytes - base["tensors"]
    result["seconds"] = time.perf_counter() - start
    return result


def planned_settings(cfg: dict) -> dict:
    """``estimate_memory`` settings of a configuration before its run, read as ``MemoryMonitor`` reads them in setup.

    The strategy's ``"auto"`` bucket sizes are resolved by the strategy's own rule on the module; the transforms and
    the attention are the configuration's. ``on_train_start`` checks them against the run's (``settings_match``).
    """
    from lightning_memopt import MemOptStrategy
    from lightning_memopt.callbacks._run_settings import optimizer_from_module, strategy_settings

    module = build_module(cfg)
    strategy = MemOptStrategy(zero=cfg["zero"], activation_checkpointing=cfg["checkpointing"])
    settings = strategy_settings(strategy, module)
    settings.update(activation_checkpointing=cfg["checkpointing"], liger=False, attention=cfg["attention"],
                    world_size=2, precision=cfg["precision"], optimizer=optimizer_from_module(module),
                    micro_batch_size=cfg["micro_batch"], seq_len=cfg["seq_len"], accumulate_grad_batches=1)  # fmt: skip
    return settings


def comparable(settings: dict) -> dict:
    """The settings that matter to the prediction (of the DeepSpeed config: its ``zero_optimization``)."""
    out = {k: v for k, v in settings.items() if k not in ("deepspeed_config", "read_attention")}
    out["zero_optimization"] = (settings.get("deepspeed_config") or {}).get("zero_optimization")
    return out


def predict(cfg: dict, settings: dict) -> dict:
    """Analytic and trace predictions of every rank of a configuration, on a freshly built copy of its model."""
    from tiny_llm import ByteWindows

    from lightning_memopt.planning import estimate_memory
    from lightning_memopt.predictor.model_spec import resolve_model

    module = build_module(cfg)
    data = ByteWindows(seq_len=cfg["seq_len"])
    batch = torch.stack([data[i] for i in range(cfg["micro_batch"])])
    out = {}
    for method in ("analytic", "trace"):
        start = time.perf_counter()
        try:
            if method == "analytic":
                est = estimate_memory(resolve_model(module), method=method, **settings)
            else:
                est = estimate_memory(module, method=method, example_batch=batch, **settings)
        except Exception as err:  # noqa: BLE001 -- a failing prediction is a result of the benchmark, reported
            out[method] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
        per_rank = est.details.get("per_rank_total") or {}
        out[method] = {"total": est.total, "per_rank": {int(r): int(v) for r, v in per_rank.items()},
                       "peak_phase": est.details.get("peak_phase"), "seconds": time.perf_counter() - start}  # fmt: skip
    return out


def rank_main(configs: list[dict], out_dir: Path) -> None:
    """What every rank runs (rank 1 is started by Lightning at the first fit and re-runs this script)."""
    from lightning_memopt.utilities.memory import DeviceMemoryProbe

    # before anything is built: everything counts. Live tensor storages (a dispatch mode, active in the thread that
    # trains) are what the issue measures; the counting allocator sees every allocation, kernel workspaces included
    # (oneDNN's bf16 matmuls on CPU take some 0.2-0.3 MB of scratch inside one op).
    probes = {"tensors": DeviceMemoryProbe("cpu", cpu_mode="dispatch"),
              "allocations": DeviceMemoryProbe("cpu", cpu_mode="allocator")}  # fmt: skip
    for probe in probes.values():
        probe.start()
    results = [run_config(probes, cfg) for cfg in configs]
    rank = results[0]["rank"]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, default=str))
    torch.distributed.barrier()
    for probe in probes.values():
        probe.close()


def attach(results: list[dict], predictions: dict[int, dict]) -> list[dict]:
    """One row per configuration and rank: measured (steps 2..N) vs each method's prediction for that rank."""
    rows = []
    for r in results:
        steps = r["steps"][1:] or r["steps"]
        steady = [s["tensors_peak"] for s in steps]
        measured, allocations = max(steady), max(s["allocations_peak"] for s in steps)
        row = {k: r[k] for k in ("family", "zero", "precision", "attention", "checkpointing", "rank", "n_params",
                                 "micro_batch", "seq_len", "leaked", "seconds")}  # fmt: skip
        row.update(measured=measured, measured_allocations=allocations, steady_spread=max(steady) - min(steady),
                   first_step=r["steps"][0]["tensors_peak"],
                   read_attention=r["settings"].get("read_attention"), settings_match=r["settings_match"],
                   settings_diff=r["settings_diff"])  # fmt: skip
        pred = predictions[r["index"]]  # keyed by configuration index
        for method in ("analytic", "trace"):
            if "error" in pred[method]:
                row.update({method: None, f"{method}_error_pct": None, f"{method}_allocations_error_pct": None,
                            f"{method}_failed": pred[method]["error"]})  # fmt: skip
                continue
            value = pred[method]["per_rank"].get(r["rank"], pred[method]["total"])
            row[method] = value
            row[f"{method}_error_pct"] = 100.0 * (value - measured) / measured
            row[f"{method}_allocations_error_pct"] = 100.0 * (value - allocations) / allocations
            row[f"{method}_phase"] = pred[method]["peak_phase"]
        rows.append(row)
    return rows


def describe(row: dict) -> str:
    return (f"{row['family']:5s} zero{row['zero']} {row['precision']:10s} {row['attention']:5s} "
            f"ckpt={'on ' if row['checkpointing'] else 'off'}")  # fmt: skip


def summary(rows: list[dict]) -> list[dict]:
    """Median and worst |error| per method, over all rows and per family: against live tensors (the targets) and
    against every allocation (``*_allocations``: kernel workspaces included)."""
    out = []
    for family in ("all", *FAMILIES):
        sel = [r for r in rows if family == "all" or r["family"] == family]
        if not sel:
            continue
        for method in ("analytic", "trace"):
            errors = [abs(r[f"{method}_error_pct"]) for r in sel if r[f"{method}_error_pct"] is not None]
            alloc = [abs(r[f"{method}_allocations_error_pct"]) for r in sel if r[f"{method}_error_pct"] is not None]
            out.append({"family": family, "method": method, "peaks": len(errors), "failed": len(sel) - len(errors),
                        "median_abs_error_pct": statistics.median(errors) if errors else None,
                        "worst_abs_error_pct": max(errors) if errors else None,
                        "median_abs_error_allocations_pct": statistics.median(alloc) if alloc else None,
                        "worst_abs_error_allocations_pct": max(alloc) if alloc else None})  # fmt: skip
    return out


def _cell(value: "int | None", error: "float | None", width: int) -> str:
    if value is None:
        return f"{'failed':>{width}s} {'':7s}"
    return f"{value / 1024:{width}.1f} {error:+7.2f}"


def _pct(value: "float | None") -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct7(value: "float | None") -> str:
    return f"{'':7s}" if value is None else f"{value:+7.2f}"


def print_report(rows: list[dict], summ: list[dict], seconds: float, n_configs: int) -> None:
    print(f"{'config':40s} rank {'tensors KiB':>11s} {'allocs KiB':>10s} {'analytic KiB':>12s} {'err %':>7s}"
          f" {'alloc %':>7s} {'trace KiB':>10s} {'err %':>7s} {'alloc %':>7s}")  # fmt: skip
    for r in rows:
        print(f"{describe(r):40s} {r['rank']:4d} {r['measured'] / 1024:11.1f} {r['measured_allocations'] / 1024:10.1f} "
              f"{_cell(r['analytic'], r['analytic_error_pct'], 12)} {_pct7(r['analytic_allocations_error_pct'])} "
              f"{_cell(r['trace'], r['trace_error_pct'], 10)} {_pct7(r['trace_allocations_error_pct'])}")  # fmt: skip
    failures = sorted(
        {(m, r[f"{m}_failed"]) for r in rows for m in ("analytic", "trace") if r.get(f"{m}_failed")}
    )
    for method, error in failures:
        print(f"{method} failed: {error}")
    print(f"\n{'family':6s} {'method':8s} {'peaks':>5s} {'failed':>6s} {'median |err| %':>15s} {'worst |err| %':>14s}"
          f" {'vs all allocations: median':>27s} {'worst':>6s}")  # fmt: skip
    for s in summ:
        print(f"{s['family']:6s} {s['method']:8s} {s['peaks']:5d} {s['failed']:6d} {_pct(s['median_abs_error_pct']):>15s} "
              f"{_pct(s['worst_abs_error_pct']):>14s} {_pct(s['median_abs_error_allocations_pct']):>27s}"
              f" {_pct(s['worst_abs_error_allocations_pct']):>6s}")  # fmt: skip
    print(f"\n{n_configs} configurations x 2 ranks in one launch: {seconds:.0f} s wall")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--attention", default=",".join(ATTENTIONS))
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument(
        "--quick", action="store_true", help=f"only the {len(QUICK)} configurations of QUICK, 3 steps"
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per configuration (steady: 2..N)"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the summary as JSON")
    parser.add_argument("--work-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def configurations(args: argparse.Namespace) -> list[dict]:
    common = {"hidden": args.hidden, "layers": args.layers, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
              "steps": 3 if args.quick and args.steps == 4 else args.steps}  # fmt: skip
    if args.quick:
        axes = QUICK
    else:
        axes = itertools.product(args.families.split(","), [int(s) for s in args.stages.split(",")],
                                 args.precisions.split(","), args.attention.split(","),
                                 [c == "on" for c in args.checkpointing.split(",")])  # fmt: skip
    configs = []
    for i, (family, zero, precision, attention, ckpt) in enumerate(axes):
        if (
            family not in FAMILIES
            or zero not in (0, 1, 2, 3)
            or precision not in PRECISIONS
            or attention not in ATTENTIONS
        ):
            raise SystemExit(f"Expected families in {FAMILIES}, stages 0-3, precisions in {PRECISIONS}, attention in"
                             f" {ATTENTIONS}; got {family!r}, {zero!r}, {precision!r}, {attention!r}.")  # fmt: skip
        configs.append({"index": i, "family": family, "zero": zero, "precision": precision, "attention": attention,
                        "checkpointing": ckpt, **common})  # fmt: skip
    return configs


def predictor_fingerprint() -> str:
    """SHA-256 of the predictor's sources, to tie a result to the code that predicted it."""
    import hashlib

    from lightning_memopt import predictor

    digest = hashlib.sha256()
    for path in sorted(Path(predictor.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configs = configurations(args)
    start = time.perf_counter()
    # rank 1 is started by Lightning's launcher at the first fit, with the same argv
    if "LOCAL_RANK" in os.environ:
        rank_main(configs, args.work_dir)
        return
    # Predict first, in a clean process: a ZeRO-3 engine leaves DeepSpeed's Linear autograd function patched in
    # process-wide (it shows in a later trace's backward), and rank 1 only starts at the first fit.
    planned = {cfg["index"]: planned_settings(cfg) for cfg in configs}
    predictions = {cfg["index"]: predict(cfg, planned[cfg["index"]]) for cfg in configs}
    predicting = time.perf_counter() - start
    work = Path(tempfile.mkdtemp(prefix="predictor_accuracy_"))
    sys.argv += ["--work-dir", str(work)]  # rank 1 re-runs this script with sys.argv
    rank_main(configs, work)
    results = [r for rank in (0, 1) for r in json.loads(Path(work, f"rank{rank}.json").read_text())]
    for name in ("rank0.json", "rank1.json"):
        Path(work, name).unlink()
    work.rmdir()
    for r in results:
        run, plan = comparable(r["settings"]), comparable(planned[r["index"]])
        r["settings_diff"] = {
            k: [plan.get(k), run.get(k)] for k in sorted(set(run) | set(plan)) if run.get(k) != plan.get(k)
        }
        r["settings_match"] = not r["settings_diff"]
    rows = attach(sorted(results, key=lambda r: (r["index"], r["rank"])), predictions)
    summ = summary(rows)
    seconds = time.perf_counter() - start
    print_report(rows, summ, seconds, len(configs))
    mismatched = [describe(r) for r in rows if not r["settings_match"]]
    print(f"(predicting {predicting:.0f} s, measuring {seconds - predicting:.0f} s; run settings differ from the"
          f" predicted ones in {len(mismatched)} rows{': ' + ', '.join(mismatched) if mismatched else ''})")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summ, "seconds": seconds,
                                        "predicting_seconds": predicting, "configurations": len(configs),
                                        "torch": torch.__version__, "lightning": pl.__version__,
                                        "predictor_sources_sha256": predictor_fingerprint()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
