import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_memopt.lightning.callbacks.transforms import ActivationCheckpointing, FlashAttention, LigerKernel
from lightning_memopt.transforms import applied_transforms


def _config():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._attn_implementation = "eager"
    return config


class TinyLM(LightningModule):
    def __init__(self, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.build_in_configure_model = build_in_configure_model
        self.losses: list[float] = []
        self.lm = None if build_in_configure_model else self._build()

    def _build(self):
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(_config())

    def configure_model(self) -> None:
        if self.lm is None:
            self.lm = self._build()

    def training_step(self, batch, batch_idx):
        loss = self.lm(input_ids=batch, labels=batch, use_cache=False).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(
            torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)), batch_size=2
        )


def _fit(module: LightningModule, callbacks: list) -> LightningModule:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return module


def test_checkpointing_and_sdpa_train_with_the_same_losses():
    reference = _fit(TinyLM(), [])
    module = _fit(TinyLM(), [ActivationCheckpointing(), FlashAttention("sdpa")])
    applied = applied_transforms(module)
    assert applied["activation_checkpointing"]["blocks"] == ["lm.model.layers.0", "lm.model.layers.1"]
    assert applied["attention"] == "sdpa" and module.lm.config._attn_implementation == "sdpa"
    assert module.losses == pytest.approx(reference.losses, rel=1e-5)


def test_applied_after_configure_model():
    module = _fit(TinyLM(build_in_configure_model=True), [ActivationCheckpointing(fraction=0.5)])
    assert applied_transforms(module)["activation_checkpointing"]["blocks"] == ["lm.model.layers.0"]
    assert "configure_model" not in module.__dict__  # the temporary hook removed itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_liger_on_cpu_fails_at_setup():
    with pytest.raises(ValueError, match="CUDA device"):
        _fit(TinyLM(), [LigerKernel()])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ActivationCheckpointing(fraction=2.0), r"\(0, 1\]"),
        (lambda: ActivationCheckpointing(fraction=0.5, every_k=2), "at most one"),
        (lambda: FlashAttention("flash3"), "one of"),
        (lambda: LigerKernel(cross_entropy=True), "at most one"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_class_fails_at_setup():
    with pytest.raises(ValueError, match="unknown"):
        _fit(TinyLM(), [ActivationCheckpointing(policy={"NoSuchLayer"})])
