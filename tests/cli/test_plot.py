"""``lightning-memopt plot``: the grid is the predictor's, the PNG has one panel per setting, bad input exits 2."""

import json

import pytest

from lightning_memopt.cli import build_parser, main
from lightning_memopt.cli.estimate import prepare
from lightning_memopt.cli.plot import PLOT_RULES, figure, memory_grid
from lightning_memopt.core.plotting import pyplot
from lightning_memopt.planning.estimate import estimate_memory


@pytest.mark.slow  # a full-size preset at every stage, seconds each: `make test-slow` (CI runs it)
def test_json_rows_are_the_predictors_estimates(capsys):
    argv = ["plot", "llama-3.2-1b", "--gpus", "4", "--seq-len", "2048", "--micro-batches", "1,4",
            "--zero-stages", "1,3", "--gpu-memory", "24GiB", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["zero"], r["checkpointing"], r["micro_batch_size"]) for r in data["rows"]] == [
        (1, False, 1), (1, False, 4), (1, True, 1), (1, True, 4), (3, False, 1), (3, False, 4), (3, True, 1),
        (3, True, 4)]  # fmt: skip
    row = data["rows"][5]
    expected = estimate_memory("llama-3.2-1b", world_size=4, zero=3, micro_batch_size=4, seq_len=2048)
    assert row["total"] == expected.total and row["activations"] == expected.activations and row["tokens"] == 8192
    assert data["png"] is None and data["margin"] == 0.1


@pytest.mark.slow  # a full-size preset at every stage, seconds each: `make test-slow` (CI runs it)
def test_the_png_has_a_panel_per_setting_and_a_device_line(tmp_path, capsys):
    out = tmp_path / "memory.png"
    argv = ["plot", "gpt2", "--gpus", "2", "--seq-len", "1024", "--gpu-memory", "8GiB", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in text
    assert "ZeRO-3, ckpt" in text and "mb 16" in text
    args = prepare(build_parser().parse_args(argv), PLOT_RULES)
    rows = memory_grid("gpt2", seq_len=1024, micro_batches=(1, 2, 4, 8, 16), zero_stages=(0, 1, 2, 3),
                       checkpointing=(False, True), world_size=2)  # fmt: skip
    fig = figure(rows, args)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 8 and panels[0].get_title() == "ZeRO-0, checkpointing off"
    assert all(ax.get_ylim()[0] == 0 for ax in panels)
    assert "device (8.0 GiB)" in [line.get_label() for line in panels[0].get_lines()]
    pyplot("test").close(fig)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plot", "8B", "--seq-len", "512", "--json"], "Expected a model with shapes"),
        (["plot", "gpt2", "--seq-len", "512"], "Expected --out FILE.png"),
        (["plot", "gpt2", "--seq-len", "512", "--engine", "torch", "--zero-stages", "3", "--json"], "--zero-stages"),
        (["plot", "gpt2", "--seq-len", "512", "--margin", "0.2", "--json"], "--margin"),
        (["plot", "gpt2", "--seq-len", "512", "--micro-batches", "0,x", "--json"], "micro-batches like 1,2,4,8"),
    ],
)
def test_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
