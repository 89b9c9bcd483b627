"""Per-rank model-state bytes per parameter by ZeRO stage, measured on a 2-process MemOptStrategy run, vs the ideal.

For each stage, a fresh process trains the repo's tiny Llama (``examples/tiny_llm.py``) for 4 steps on CPU with
``--devices`` processes (gloo), bf16-mixed, torch AdamW; every rank reads its engine's live model-state tensors
with :func:`lightning_memopt.measuring.zero_state.model_state_bytes` twice in the third step: before the
optimizer step (gradients held, Adam states created by the earlier steps) and after it (gradients released).
The ideal is Rajbhandari et al. (2020), "ZeRO", Section 5.1 / Figure 1, with K = 12 bytes of fp32 master
parameters and Adam states per parameter and N ranks: stage 0 2 + 2 + K; stage 1 2 + 2 + K/N;
stage 2 2 + (2 + K)/N; stage 3 (2 + 2 + K)/N.

    python benchmarks/zero_memory_by_stage.py --out zero_by_stage.json
    python benchmarks/zero_memory_by_stage.py --stages 2 3 --hidden-size 128
"""

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("parameters", "master_parameters", "gradients", "optimizer_states")


def ideal_bytes_per_param(stage: int, world_size: int, k: int = 12) -> float:
    """ZeRO paper, Section 5.1: bytes per parameter per rank under mixed-precision Adam (fp16/bf16 weights)."""
    return [2 + 2 + k, 2 + 2 + k / world_size, 2 + (2 + k) / world_size, (2 + 2 + k) / world_size][stage]


def child(args: argparse.Namespace) -> None:
    """One fit (this script re-run by Lightning on every rank); each rank writes ``rank<r>.json``."""
    sys.path.insert(0, str(ROOT / "examples"))
    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    from tiny_llm import CausalLM, TextDataModule

    from lightning_memopt import MemOptStrategy
    from lightning_memopt.measuring.zero_state import model_state_bytes

    class Reader(pl.Callback):
        def __init__(self) -> None:
            self.states: dict = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if trainer.global_step == 2:
                self.states["before_step"] = model_state_bytes(trainer.strategy.model).to_dict()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                self.states["after_step"] = model_state_bytes(trainer.strategy.model).to_dict()

    reader = Reader()
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=MemOptStrategy(zero=args.child_stage), precision="bf16-mixed",
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[reader],
    )
    model = CausalLM(hidden_size=args.hidden_size, num_layers=args.layers)
    trainer.fit(model, TextDataModule(batch_size=2, seq_len=32))
    n = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.lightning_module.parameters())
    (args.child_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps({"n_parameters": n, **reader.states}))


def run_stage(stage: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child-stage", str(stage), "--child-dir", tmp,
               "--devices", str(args.devices), "--hidden-size", str(args.hidden_size), "--layers", str(args.layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    n = ranks[0]["n_parameters"]
    result = {"stage": stage, "n_parameters": n, "world_size": len(ranks),
              "ideal": ideal_bytes_per_param(stage, len(ranks))}  # fmt: skip
    for moment in ("before_step", "after_step"):
        per_rank = [{c: r[moment][c] / n for c in CATEGORIES} | {"total": sum(r[moment][c] for c in CATEGORIES) / n}
                    for r in ranks]
        result[moment] = {"per_rank_bytes_per_param": per_rank, "max_rank": max(per_rank, key=lambda r: r["total"])}
    return result


def table(rows: list[dict]) -> str:
    lines = [("| ZeRO stage | params | master fp32 | grads | optimizer | total before step (max rank) | ideal (paper) |"
             " total / ideal | total after step |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m, after = r["before_step"]["max_rank"], r["after_step"]["max_rank"]["total"]
        lines.append(f"| {r['stage']} | {m['parameters']:.2f} | {m['master_parameters']:.2f} | {m['gradients']:.2f} | "
                     f"{m['optimizer_states']:.2f} | {m['total']:.2f} | {r['ideal']:.2f} | "
                     f"{m['total'] / r['ideal']:.2f} | {after:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child-stage", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stage is not None:
        return child(args)
    rows = [run_stage(stage, args) for stage in args.stages]
    print(f"bytes per parameter per rank, {rows[0]['n_parameters']:,} parameters, {rows[0]['world_size']} CPU ranks"
          ", bf16-mixed, AdamW; categories before the third optimizer step")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
