"""The batch a config-only prediction traces: lengths a learned position table cannot take are refused up front."""

import pytest
import torch
import transformers

from lightning_memopt.planning import estimate_memory

TINY = {"vocab_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128}
#: model_type -> (config fields, positions a real step takes)
LEARNED = {
    "gpt2": ({"vocab_size": 256, "n_embd": 64, "n_layer": 1, "n_head": 4, "n_positions": 96}, 96),
    "bert": ({**TINY, "hidden_size": 64, "max_position_embeddings": 96}, 96),
    "roberta": ({**TINY, "hidden_size": 64, "max_position_embeddings": 98}, 96),  # rows after the padding row
    "opt": ({**TINY, "hidden_size": 64, "ffn_dim": 128, "max_position_embeddings": 96, "word_embed_proj_dim": 64}, 96),
}


def _real_step(model_type: str, fields: dict, seq_len: int) -> None:
    config = transformers.AutoConfig.for_model(model_type, **fields)
    masked = model_type in ("bert", "roberta")
    model = (transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM).from_config(config)
    ids = torch.randint(3, 256, (1, seq_len))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("model_type", sorted(LEARNED))
def test_a_sequence_longer_than_the_learned_positions_is_refused_as_the_real_step_fails(model_type):
    fields, rows = LEARNED[model_type]
    config = {"model_type": model_type, **fields}
    _real_step(model_type, fields, rows)  # the longest sequence runs for real, and is predicted
    assert estimate_memory(config, engine="torch", micro_batch_size=1, seq_len=rows).total > 0
    with pytest.raises((IndexError, RuntimeError)):  # one position more has no row (or no position id)
        _real_step(model_type, fields, rows + 1)
    with pytest.raises(ValueError, match=rf"Expected seq_len <= {rows} .* got seq_len={rows + 1}\. Fix: "):
        estimate_memory(config, engine="torch", micro_batch_size=1, seq_len=rows + 1)


def test_rotary_positions_take_any_length():
    config = {"model_type": "llama", **TINY, "hidden_size": 64, "max_position_embeddings": 32}
    short, long = (estimate_memory(config, engine="torch", micro_batch_size=1, seq_len=s).total for s in (32, 64))
    assert long > short


def test_without_seq_len_the_longest_sequence_the_model_takes_is_traced():
    roberta = {"model_type": "roberta", **LEARNED["roberta"][0]}
    assert estimate_memory(roberta, engine="torch").details["seq_len"] == 96  # max_position_embeddings less padding
    llama = {"model_type": "llama", **TINY, "hidden_size": 64, "max_position_embeddings": 48}
    assert estimate_memory(llama, engine="torch").details["seq_len"] == 48
