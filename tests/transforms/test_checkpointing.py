import pytest
import torch
from torch import nn
from transforms import _models as M

from lightning_memopt.transforms import (
    applied_transforms,
    apply_activation_checkpointing,
    blocks_to_checkpoint,
    remove_activation_checkpointing,
)

KINDS = ["llama", "qwen2", "mistral", "plain"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_losses_and_grads_equal_with_full_checkpointing(kind, ids):
    reference, model = M.make(kind), M.make(kind)
    M.loss_of(reference, ids).backward()
    apply_activation_checkpointing(model)
    loss = M.loss_of(model, ids)
    loss.backward()
    torch.testing.assert_close(loss, M.loss_of(reference, ids).detach())
    expected, got = M.grads(reference), M.grads(model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_full_checkpointing_reaches_90_percent_of_ideal_reduction(kind, ids):
    # per-block saved bytes from the difference of a 4- and a 2-block stack; a checkpointed block keeps its
    # input
    two, four = M.saved_bytes(M.make(kind, 2), ids), M.saved_bytes(M.make(kind, 4), ids)
    per_block = (four - two) / 2
    block_input = ids.numel() * 64 * 4  # (batch, seq, hidden) fp32
    ideal = 4 * (per_block - block_input)
    model = apply_activation_checkpointing(M.make(kind, 4))
    achieved = four - M.saved_bytes(model, ids)
    assert achieved >= 0.9 * ideal, (achieved, ideal)


def test_auto_policy_uses_hf_no_split_modules_and_plain_module_lists():
    assert blocks_to_checkpoint(M.make("llama", 3)) == [f"model.layers.{i}" for i in range(3)]
    assert blocks_to_checkpoint(M.make("plain", 3)) == ["blocks.0", "blocks.1", "blocks.2"]


def test_policy_forms_select_the_same_blocks():
    model = M.make("plain", 3)
    expected = ["blocks.0", "blocks.1", "blocks.2"]
    assert blocks_to_checkpoint(model, {"PlainBlock"}) == expected
    assert blocks_to_checkpoint(model, M.PlainBlock) == expected
    assert blocks_to_checkpoint(model, lambda m: isinstance(m, M.PlainBlock)) == expected
    # outermost matches only: the MLP Sequential lies inside a PlainBlock
    assert blocks_to_checkpoint(model, {"PlainBlock", "Sequential"}) == expected


def test_fraction_and_every_k_choose_blocks_and_record_them(ids):
    model = M.make("llama", 4)
    apply_activation_checkpointing(model, fraction=0.5)
    record = applied_transforms(model)["activation_checkpointing"]
    assert record["blocks"] == ["model.layers.0", "model.layers.1"]
    assert record["fraction"] == 0.5 and record["candidates"] == 4
    apply_activation_checkpointing(model, every_k=3)  # replaces the earlier application
    assert applied_transforms(model)["activation_checkpointing"]["blocks"] == [
        "model.layers.0",
        "model.layers.3",
    ]
    assert "forward" not in model.model.layers[1].__dict__
    apply_activation_checkpointing(model, fraction=3 / 4)
    assert len(applied_transforms(model)["activation_checkpointing"]["blocks"]) == 3


def test_partial_checkpointing_saves_between_none_and_full(ids):
    none = M.saved_bytes(M.make("llama", 4), ids)
    half = M.saved_bytes(apply_activation_checkpointing(M.make("llama", 4), fraction=0.5), ids)
    full = M.saved_bytes(apply_activation_checkpointing(M.make("llama", 4)), ids)
    assert full < half < none


def test_remove_restores_the_original_forward(ids):
    model = M.make("plain", 2)
    before = M.saved_bytes(model, ids)
    remove_activation_checkpointing(apply_activation_checkpointing(model))
    assert M.saved_bytes(model, ids) == before
    assert "activation_checkpointing" not in applied_transforms(model)


def test_state_dict_keys_unchanged():
    model = M.make("llama")
    keys = list(model.state_dict())
    apply_activation_checkpointing(model)
    assert list(model.state_dict()) == keys


def test_hf_cache_is_not_written_twice_under_checkpointing(ids):
    reference, model = M.make("llama"), M.make("llama")
    apply_activation_checkpointing(model)
    expected = reference(input_ids=ids, labels=ids, use_cache=False).loss
    loss = model(
        input_ids=ids, labels=ids, use_cache=True
    ).loss  # a cache write in recomputation would break it
    loss.backward()
    torch.testing.assert_close(loss, expected)


def test_reentrant_matches(ids):
    reference, model = M.make("plain"), M.make("plain")
    M.loss_of(reference, ids).backward()
    apply_activation_checkpointing(model, reentrant=True)
    M.loss_of(model, ids).backward()
    for name, grad in M.grads(reference).items():
        torch.testing.assert_close(M.grads(model)[name], grad, msg=name)


def test_eval_mode_runs_without_checkpoint(ids):
    model = apply_activation_checkpointing(M.make("plain")).eval()
    with torch.no_grad():
        assert model(ids).shape == (2, 32, 256)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": {"NoSuchBlock"}}, ValueError, "unknown"),
        ({"policy": "NoSuchBlock"}, ValueError, "unknown"),
        ({"policy": lambda m: False}, ValueError, "match"),
        ({"policy": 3}, TypeError, "policy"),
        ({"policy": [3]}, TypeError, "class names"),
        ({"fraction": 0.0}, ValueError, r"\(0, 1\]"),
        ({"fraction": 1.5}, ValueError, r"\(0, 1\]"),
        ({"fraction": -0.1}, ValueError, r"\(0, 1\]"),
        ({"every_k": 0}, ValueError, "every_k"),
        ({"fraction": 0.5, "every_k": 2}, ValueError, "at most one"),
        ({"reentrant": "yes"}, TypeError, "reentrant"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_activation_checkpointing(M.make("plain"), **kwargs)


def test_auto_without_repeated_blocks_raises():
    with pytest.raises(ValueError, match="repeated blocks"):
        blocks_to_checkpoint(nn.Linear(2, 2))
