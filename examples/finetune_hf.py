"""Fine-tune a Hugging Face causal LM with ZeRO-3, activation checkpointing, flash attention and Liger kernels.

The model is built from a config (random weights; ``--preset``) or loaded from local weights
(``--model-path``, a directory written by ``save_pretrained``; nothing is downloaded). The text is
``data/lecture-notes.txt``, tokenized with the model's tokenizer when ``--model-path`` has one, else as bytes.
The strategy is the whole change:

    MemOptStrategy(zero=3, activation_checkpointing=True, attention="auto", liger=True)

``attention="auto"`` picks flash_attention_2 where flash-attn is installed (CUDA, bf16), else SDPA. Liger's
Triton kernels need CUDA; ``--cpu`` turns them off and uses SDPA.

CPU (no GPU needed; 2 steps of the tiny preset, one process):

    python examples/finetune_hf.py --cpu --steps 2

One node, 8 GPUs (Lightning starts the 8 processes itself, or use torchrun):

    python examples/finetune_hf.py --model-path /models/llama-3.2-1b --devices 8 --steps 1000
    torchrun --nproc-per-node 8 examples/finetune_hf.py --model-path /models/llama-3.2-1b --devices 8

Two nodes x 8 GPUs with torchrun (run on every node; NODE_RANK 0 and 1, MASTER_ADDR the first node):

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr $MASTER_ADDR --master-port 29500 \\
        examples/finetune_hf.py --model-path /models/llama-3.1-8b --devices 8 --num-nodes 2

Two nodes x 8 GPUs with SLURM (Lightning reads the SLURM environment; one task per GPU):

    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=8
    #SBATCH --gpus-per-node=8
    srun python examples/finetune_hf.py --model-path /models/llama-3.1-8b --devices 8 --num-nodes 2

A model built from a config is created inside ``configure_model``, so under ZeRO-3 each rank allocates only its
shard (DeepSpeed's ``zero.Init``). Weights from ``--model-path`` are loaded whole on every rank's host memory
first, then sharded by DeepSpeed: fine up to a few billion parameters per node.
"""

import argparse
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llm import TEXT

from lightning_memopt import MemOptStrategy

#: model shapes built from a config (Llama architecture): hidden size, layers, heads, key/value heads, FFN size.
PRESETS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
             "intermediate_size": 2048},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192},
}


class TokenWindows(Dataset):
    """Consecutive ``seq_len``-token windows of a token sequence, ``seq_len // 2`` apart."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if len(tokens) < seq_len:
            raise ValueError(f"Expected at least seq_len={seq_len} tokens of text, got {len(tokens)}.")
        self.tokens, self.seq_len, self.stride = tokens, seq_len, max(1, seq_len // 2)

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len) // self.stride + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index * self.stride : index * self.stride + self.seq_len]


def tokenize(model_path: Path | None) -> torch.Tensor:
    """The shipped text as token ids: the tokenizer at ``model_path`` if there is one, else its bytes."""
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if model_path is not None and any((model_path / name).exists() for name in tokenizer_files):
        from transformers import AutoTokenizer

        return torch.tensor(AutoTokenizer.from_pretrained(model_path)(TEXT.read_text())["input_ids"], dtype=torch.long)
    return torch.tensor(list(TEXT.read_bytes()), dtype=torch.long)


class FineTune(pl.LightningModule):
    """Next-token fine-tuning of a Hugging Face causal LM.

    Args:
        model_path: a local ``save_pretrained`` directory; ``None`` builds ``preset`` from a config.
        preset: a key of ``PRESETS`` (random weights, 256-token byte vocabulary).
        lr: AdamW learning rate.
    """

    def __init__(self, model_path: str | None = None, preset: str = "tiny", lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        if model_path is not None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, max_position_embeddings=4096, **PRESETS[self.hparams.preset])
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr)


class PrintLoss(pl.Callback):
    """Prints the rank-0 loss of every step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}: loss {float(outputs['loss']):.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="local Hugging Face model directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shape built from a config")
    parser.add_argument("--cpu", action="store_true", help="run on CPU: Liger off, attention sdpa")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("Expected a CUDA GPU, got none. Fix: pass --cpu to run on CPU (Liger off, attention sdpa).")

    pl.seed_everything(0)
    strategy = MemOptStrategy(
        zero=3,
        activation_checkpointing=True,
        attention="sdpa" if args.cpu else "auto",
        liger=not args.cpu,
    )
    trainer = pl.Trainer(
        accelerator="cpu" if args.cpu else "cuda",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PrintLoss()],
    )
    tokens = tokenize(args.model_path)
    data = DataLoader(TokenWindows(tokens, args.seq_len), batch_size=args.batch_size, shuffle=True)
    model_path = None if args.model_path is None else str(args.model_path)
    trainer.fit(FineTune(model_path, args.preset, args.lr), data)


if __name__ == "__main__":
    main()
