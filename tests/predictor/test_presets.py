import pytest

from lightning_memopt.predictor import resolve_model
from lightning_memopt.predictor.presets import PRESETS, get_preset

# published parameter counts of the released checkpoints
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "gpt2": 124_439_808,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_the_released_models(name):
    assert resolve_model(name).num_parameters == PUBLISHED[name]


def test_every_preset_is_tested():
    assert set(PRESETS) == set(PUBLISHED)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-3-8b"):
        get_preset("llama-4-900b")
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        resolve_model("not-a-model")
