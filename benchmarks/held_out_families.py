"""``estimate_memory`` on Hugging Face families the accuracy matrix does not cover, against real CPU runs.

The matrix of ``benchmarks/predictor_accuracy.py`` has 11 kinds (Llama, Qwen2, plain PyTorch, T5, BERT, Mixtral,
ViT, a CNN, LoRA, a partly frozen Llama, GPT-NeoX). This script takes other families (decoders, encoder-decoders,
masked LMs, speech, vision), each a tiny model from its config with random weights (2 blocks or stages, hidden 64,
vocabulary 256, :data:`FAMILIES`), and runs the matrix's single-device configurations on them: Lightning's
single-device strategy (engine ``"torch"``), {32-true, bf16-mixed} x {eager, sdpa where the family has SDPA} x
checkpointing off/on (the package's ``ActivationCheckpointing`` callback; ``activation_checkpointing=True`` predicted).

Fair by construction: a family plugs its module and data into ``predictor_accuracy``'s own ``predict`` and
``run_config`` (the same LightningModule, ``HFModule``, with its own loss; the same Trainer, the same counting
allocator as the judge, baseline right before the model is built, peak reset per step, steady state = steps 2..N;
the same claim, ``accuracy_targets.within_claim``). Every family runs in a fresh subprocess of its own (predicting
first, then measuring), so nothing an earlier family left behind is in a later measurement, and a crash stays with its
family.

Usage::

    python benchmarks/held_out_families.py       # every family, to benchmarks/results/held_out_families.json
    python benchmarks/held_out_families.py --families gpt2,bart --precisions 32-true
"""

import argparse
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

SEQ_LEN, MICRO_BATCH, VOCAB, HIDDEN, LAYERS = 64, 2, 256, 64, 2
IMAGE_SIZE, CLASSES, MEL_BINS = 32, 10, 16

_LM = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
_SEQ2SEQ = {"vocab_size": VOCAB, "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 2 * HIDDEN,
            "decoder_ffn_dim": 2 * HIDDEN, "max_position_embeddings": 256}  # fmt: skip
_ENCODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "intermediate_size": 2 * HIDDEN, "max_position_embeddings": 256}  # fmt: skip

#: family -> (architecture, model_type, config fields, data: "causal" | "masked" | "seq2seq" | "speech" | "image")
FAMILIES: "dict[str, tuple[str, str, dict, str]]" = {
    "gpt2": (
        "GPT2LMHeadModel",
        "gpt2",
        {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 256},
        "causal",
    ),
    "opt": (
        "OPTForCausalLM",
        "opt",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": 256,
        },
        "causal",
    ),
    "bloom": (
        "BloomForCausalLM",
        "bloom",
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": 4},
        "causal",
    ),
    "falcon": (
        "FalconForCausalLM",
        "falcon",
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4},
        "causal",
    ),
    "gptj": (
        "GPTJForCausalLM",
        "gptj",
        {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "rotary_dim": 8, "n_positions": 256},
        "causal",
    ),
    "codegen": (
        "CodeGenForCausalLM",
        "codegen",
        {
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": 4,
            "rotary_dim": 8,
            "n_positions": 256,
            "n_ctx": 256,
        },
        "causal",
    ),
    "stablelm": ("StableLmForCausalLM", "stablelm", dict(_LM), "causal"),
    "phi": ("PhiForCausalLM", "phi", dict(_LM, partial_rotary_factor=0.5), "causal"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text", dict(_LM, head_dim=16, sliding_window=16), "causal"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", dict(_LM, head_dim=16), "causal"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2", dict(_LM), "causal"),
    "cohere": ("CohereForCausalLM", "cohere", dict(_LM), "causal"),
    "granite": ("GraniteForCausalLM", "granite", dict(_LM), "causal"),
    "starcoder2": ("Starcoder2ForCausalLM", "starcoder2", dict(_LM), "causal"),
    "mpt": (
        "MptForCausalLM",
        "mpt",
        {
            "vocab_size": VOCAB,
            "d_model": HIDDEN,
            "n_heads": 4,
            "n_layers": LAYERS,
            "expansion_ratio": 2,
            "max_seq_len": 256,
        },
        "causal",
    ),
    "bart": ("BartForConditionalGeneration", "bart", dict(_SEQ2SEQ), "seq2seq"),
    "mbart": ("MBartForConditionalGeneration", "mbart", dict(_SEQ2SEQ), "seq2seq"),
    "pegasus": ("PegasusForConditionalGeneration", "pegasus", dict(_SEQ2SEQ), "seq2seq"),
    # Whisper's encoder takes 2 x max_source_positions frames of num_mel_bins features
    "whisper": (
        "WhisperForConditionalGeneration",
        "whisper",
        dict(
            _SEQ2SEQ,
            num_mel_bins=MEL_BINS,
            max_source_positions=SEQ_LEN // 2,
            max_target_positions=256,
            decoder_start_token_id=1,
            pad_token_id=0,
        ),
        "speech",
    ),
    "roberta": ("RobertaForMaskedLM", "roberta", dict(_ENCODER, max_position_embeddings=258), "masked"),
    "electra": ("ElectraForMaskedLM", "electra", dict(_ENCODER, embedding_size=HIDDEN), "masked"),
    "deberta_v2": ("DebertaV2ForMaskedLM", "deberta-v2", dict(_ENCODER), "masked"),
    "distilbert": (
        "DistilBertForMaskedLM",
        "distilbert",
        {
            "vocab_size": VOCAB,
            "dim": HIDDEN,
            "n_layers": LAYERS,
            "n_heads": 4,
            "hidden_dim": 2 * HIDDEN,
            "max_position_embeddings": 256,
        },
        "masked",
    ),
    "swin": (
        "SwinForImageClassification",
        "swin",
        {
            "image_size": IMAGE_SIZE,
            "patch_size": 2,
            "embed_dim": 32,
            "depths": [2, 2],
            "num_heads": [2, 4],
            "window_size": 4,
            "num_labels": CLASSES,
        },
        "image",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "convnext",
        {
            "image_size": IMAGE_SIZE,
            "num_channels": 3,
            "hidden_sizes": [32, HIDDEN],
            "depths": [2, 2],
            "num_stages": 2,
            "num_labels": CLASSES,
        },
        "image",
    ),
}
#: families whose kernels include convolutions (oneDNN's workspace: ``accuracy_targets.scratch_allowance``)
CONVOLUTIONS = ("whisper", "swin", "convnext")
PRECISIONS = ("32-true", "bf16-mixed")


def family_config(family: str) -> "dict[str, Any]":
    """The ``config.json`` dict of a family (``HFModule`` builds ``architectures[0]`` from it)."""
    architecture, model_type, fields, _ = FAMILIES[family]
    return {"model_type": model_type, **fields, "architectures": [architecture]}


def build_family_module(family: str, attention: "str | None") -> Any:
    """The family's LightningModule: the matrix's ``HFModule`` (the Hugging Face model, its own loss, AdamW)."""
    from accuracy_kinds import HFModule

    torch.manual_seed(0)
    return HFModule(family_config(family), attention)


class FamilyData(torch.utils.data.Dataset):
    """A family's samples: byte windows of the shipped text (``seq_len`` bytes) as the matrix's kinds take them
    (causal: labels = inputs; masked: every 7th token masked and predicted; seq2seq: the next window is the
    target), seeded random log-mel features (speech) or images (vision)."""

    def __init__(self, family: str, seq_len: int, size: int = 32) -> None:
        from tiny_llm import ByteWindows

        self.data = FAMILIES[family][3]
        self.text = ByteWindows(seq_len=seq_len)
        self.seq_len, self.size = seq_len, min(size, len(self.text) - 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> "dict[str, torch.Tensor]":
        gen = torch.Generator().manual_seed(index)
        if self.data == "image":
            return {"pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
                    "labels": torch.tensor(index % CLASSES)}  # fmt: skip
        ids = self.text[index]
        if self.data == "masked":
            masked = torch.arange(len(ids)) % 7 == 3
            return {"input_ids": ids.masked_fill(masked, 0), "labels": ids.masked_fill(~masked, -100)}
        if self.data == "seq2seq":
            return {"input_ids": ids, "labels": self.text[index + 1]}
        if self.data == "speech":  # Whisper's encoder takes 2 x max_source_positions frames
            return {"input_features": torch.randn(MEL_BINS, self.seq_len, generator=gen), "labels": ids}
        return {"input_ids": ids, "labels": ids.clone()}


def family_loader(cfg: "dict[str, Any]") -> Any:
    """The training loader of a configuration (no shuffling: every run sees the same batches)."""
    return torch.utils.data.DataLoader(FamilyData(cfg["kind"], cfg["seq_len"]), batch_size=cfg["micro_batch"])


def family_batch(family: str, seq_len: int = SEQ_LEN, micro_batch: int = MICRO_BATCH) -> Any:
    """The first micro-batch a family's run trains on."""
    return next(iter(family_loader({"kind": family, "seq_len": seq_len, "micro_batch": micro_batch})))


def attentions_of(family: str) -> "tuple[list, dict]":
    """The attention implementations the family builds with and, per one it refuses, transformers' reason (a model
    without attention, ConvNeXt, still builds with ``"eager"``, the implementation its config then holds)."""
    ok, refused = [], {}
    for attention in ("eager", "sdpa"):
        try:
            build_family_module(family, attention)
            ok.append(attention)
        except (ValueError, ImportError) as err:
            refused[attention] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return ok, refused


# ---------------------------------------------------------------- one family, in a process of its own
def family_worker(family: str, args: argparse.Namespace, out: Path) -> None:
    """Predict every configuration of the family (before anything is measured), then run them: through
    ``predictor_accuracy``'s own ``predict`` and ``run_config``, with the family's module and data."""
    import predictor_accuracy as pa

    pa.build_module = lambda cfg: build_family_module(cfg["kind"], cfg["attention"])
    pa.first_batch = lambda cfg: family_batch(cfg["kind"], cfg["seq_len"], cfg["micro_batch"])
    pa.dataloader = family_loader
    attentions, refused = attentions_of(family)
    wanted = [a for a in attentions if a in args.attention.split(",")]
    configs = []
    for precision in args.precisions.split(","):
        for attention in wanted:
            for ckpt in args.checkpointing.split(","):
                configs.append({"index": len(configs), "kind": family, "stage": "single", "world_size": 1,
                                "precision": precision, "attention": attention, "checkpointing": ckpt == "on",
                                "accumulate": 1, "offload": "none", "runs_on_cpu": True, "hidden": HIDDEN,
                                "layers": LAYERS, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                                "steps": args.steps})  # fmt: skip
    predictions = {}
    for cfg in configs:
        try:
            predictions[cfg["index"]] = pa.predict(cfg)
        except Exception as err:  # building the module or reading its settings failed: the run says why
            where = traceback.extract_tb(err.__traceback__)[-1]
            predictions[cfg["index"]] = {"module": {"failed": "crash", "error": f"{type(err).__name__}: "
                                                    f"{str(err).splitlines()[0][:300]} ({Path(where.filename).name}:"
                                                    f"{where.lineno})"}, "settings": {}}  # fmt: skip
    probes = pa.start_probes()
    results = [pa.run_config(probes, cfg) for cfg in configs]
    for probe in probes.values():
        probe.close()
    for r in results:
        r["settings_diff"] = pa.settings_diff(predictions[r["index"]]["settings"], r["run_settings"])
        r["settings_match"] = not r["settings_diff"]
    rows = pa.rows_of(results, predictions, ("module",))
    for row in rows:
        row["convolutions"] = family in CONVOLUTIONS
        if row.get("module") is not None:
            from accuracy_targets import within_claim

            row["module_within_claim"] = within_claim(row["module"], row["measured"], row["precision"],
                                                      row["convolutions"])  # fmt: skip
    out.write_text(json.dumps({"rows": rows, "refused_attention": refused}, default=str))


def run_family(family: str, argv: "list[str]") -> dict:
    """A family's rows from a fresh subprocess (this script with ``--worker``)."""
    with tempfile.TemporaryDirectory(prefix="held_out_") as work:
        out = Path(work, "rows.json")
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", family, "--worker-out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"family": family, "failed": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}", "rows": [],
                    "seconds": seconds, "command": shlex.join(command)}  # fmt: skip
        return {"family": family, "failed": None, **json.loads(out.read_text()), "seconds": seconds}


def _pct(value: "float | None") -> str:
    return "-" if value is None else f"{value:+.2f}"


def print_table(families: "list[dict]") -> None:
    print(f"\n{'family':<12} {'precision':<10} {'attention':<9} {'ckpt':<5} {'predicted':>11} {'measured':>11}"
          f" {'error %':>8} {'tensors %':>9}  note")  # fmt: skip
    for fam in families:
        if fam["failed"]:
            print(f"{fam['family']:<12} FAILED: {fam['failed']}")
            continue
        for r in fam["rows"]:
            note = r.get("run_failed") or r.get("module_error") or ""
            if r.get("module_within_claim") is False:
                note = "OUTSIDE CLAIM " + note
            if r.get("settings_diff"):
                note += f" settings differ: {r['settings_diff']}"
            ckpt = "on" if r["checkpointing"] else "off"
            print(f"{r['kind']:<12} {r['precision']:<10} {r['attention']!s:<9} {ckpt:<5}"
                  f" {r.get('module') or '-':>11} {r.get('measured') or '-':>11} {_pct(r.get('module_error_pct')):>8}"
                  f" {_pct(r.get('module_tensors_error_pct')):>9}  {note}")  # fmt: skip
        for attention, reason in fam.get("refused_attention", {}).items():
            print(f"{fam['family']:<12} ({attention} not built: {reason})")


def summarize(families: "list[dict]") -> dict:
    rows = [r for fam in families for r in fam["rows"]]
    compared = [r for r in rows if r.get("module") is not None]
    errors = sorted(abs(r["module_error_pct"]) for r in compared)
    worst = {}
    for fam in families:
        errs = [abs(r["module_error_pct"]) for r in fam["rows"] if r.get("module") is not None]
        worst[fam["family"]] = max(errs) if errs else None
    return {
        "families": len(families), "configurations": len(rows), "compared": len(compared),
        "median_abs_error_pct": errors[len(errors) // 2] if errors else None,
        "worst_abs_error_pct": errors[-1] if errors else None,
        "over_1pct": sum(e > 1.0 for e in errors),
        "outside_claim": sum(r.get("module_within_claim") is False for r in compared),
        "refusals": sum(r.get("module_failed") == "refusal" for r in rows),
        "crashes": sum(r.get("module_failed") == "crash" for r in rows),
        "runs_failed": sum(bool(r.get("run_failed")) for r in rows),
        "families_failed": [fam["family"] for fam in families if fam["failed"]],
        "worst_by_family": worst,
    }  # fmt: skip


def parse_args(argv: "list[str]") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"among {','.join(FAMILIES)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--attention", default="eager,sdpa", help="where the family builds with it")
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (steady: 2..N)")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" /
                        "held_out_families.json")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"Expected --families among {','.join(FAMILIES)}, got {unknown}. Fix: e.g. --families gpt2")
    return args


def main(argv: "list[str] | None" = None) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        family_worker(args.worker, args, args.worker_out)
        return
    start = time.perf_counter()
    families = []
    for family in args.families.split(","):
        fam = run_family(family, argv)
        families.append(fam)
        errs = [abs(r["module_error_pct"]) for r in fam["rows"] if r.get("module") is not None]
        print(f"{family}: {len(fam['rows'])} configurations, worst |error| "
              f"{max(errs) if errs else float('nan'):.2f} %, {fam['seconds']:.0f} s"
              f"{'  FAILED: ' + fam['failed'] if fam['failed'] else ''}", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    print_table(families)
    summ = summarize(families)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *argv])
    print(f"\n{summ['configurations']} configurations of {summ['families']} families, {summ['compared']} compared:"
          f" median |error| {summ['median_abs_error_pct']:.2f} %, worst {summ['worst_abs_error_pct']:.2f} %,"
          f" {summ['over_1pct']} over 1 %, {summ['outside_claim']} outside the claim, {summ['refusals']} refusals,"
          f" {summ['crashes']} crashes, {summ['runs_failed']} runs failed; {seconds:.0f} s.")  # fmt: skip
    print(f"Command: {command}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"families": families, "summary": summ, "seconds": seconds, "command": command,
                                    "torch": torch.__version__, "transformers": __import__("transformers").__version__},
                                   indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
