import pytest
import torch

from lightning_memopt.predictor.precision import PRECISIONS, resolve_precision


@pytest.mark.parametrize(("alias", "name"), [("bf16", "bf16-mixed"), ("16", "16-mixed"), (32, "32-true")])
def test_aliases_map_to_lightning_names(alias, name):
    assert resolve_precision(alias).name == name


def test_deepspeed_trains_16bit_weights_torch_keeps_them_as_held():
    p = resolve_precision("16-mixed")
    assert p.param_dtype("deepspeed") == torch.float16
    assert p.param_dtype("torch") is None  # plain AMP trains the weights in the dtype the module holds them in
    assert resolve_precision("bf16-true").param_dtype("torch") == torch.bfloat16
    assert resolve_precision("32-true").param_bytes("deepspeed") == 4


def test_unknown_precision_lists_known_names():
    with pytest.raises(ValueError, match="bf16-mixed"):
        resolve_precision("fp8")
    assert set(PRECISIONS) >= {"16-mixed", "bf16-mixed", "32-true", "bf16-true"}
