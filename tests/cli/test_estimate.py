"""`lightning-memopt estimate` and `plan`: output, JSON in bytes, exit code 2 with one line on bad input."""

import json
import subprocess
import sys

import pytest

from lightning_memopt.cli import main
from lightning_memopt.cli.estimate import parse_count, parse_model
from lightning_memopt.planning import estimate_memory
from lightning_memopt.predictor.quantization import estimate_quantized


def test_parse_count_and_model():
    assert [parse_count(t) for t in ("4M", "2.5e6", "8B", "7.5e9", "4,000,000", "125k")] == [
        4_000_000, 2_500_000, 8_000_000_000, 7_500_000_000, 4_000_000, 125_000]
    assert parse_model("70B") == 70_000_000_000 and parse_model("gpt2") == "gpt2"
    with pytest.raises(ValueError, match="like 4M"):
        parse_count("4Q")


def test_estimate_json_is_the_memory_estimate_in_bytes(capsys):
    argv = ["estimate", "llama-3-8b", "--gpus", "8", "--zero", "3", "--micro-batch", "2", "--seq-len", "4096",
            "--checkpointing", "--offload-optimizer", "cpu", "--gpu-memory", "80GiB", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory("llama-3-8b", world_size=8, zero=3, micro_batch_size=2, seq_len=4096,
                               activation_checkpointing=True, offload_optimizer="cpu")
    for key, value in expected.to_dict().items():
        if key != "details":
            assert data[key] == value, key
    assert data["fits"] == expected.fits(80 * 2**30, margin=0.1) and data["device_memory"] == 80 * 2**30


def test_estimate_parameter_count_table_and_fit_line(capsys):
    assert main(["estimate", "8B", "--engine", "torch", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "total (peak)" in out and "does NOT fit in 80.00 GiB" in out  # 16 bytes/param = 119 GiB


def test_estimate_quantized_inference(capsys):
    assert main(["estimate", "llama-3-8b", "--quantization", "q8_0", "--inference", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == estimate_quantized("llama-3-8b", "q8_0").parameters == 8_532_934_656


def test_plan_json(capsys):
    argv = ["plan", "llama-3-8b", "--gpu-memory", "80GiB", "--gpus", "8", "--seq-len", "4096",
            "--global-batch-tokens", "4M", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["global_batch_tokens"] == 4_000_000 and data["achieved_global_batch_tokens"] >= 4_000_000
    assert data["estimate"]["total"] <= data["budget"]


def test_plan_with_no_fit_exits_1(capsys):
    argv = ["plan", "llama-3-70b", "--gpu-memory", "8GiB", "--seq-len", "8192", "--global-batch-tokens", "1M"]
    assert main(argv) == 1
    assert "smallest prediction" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["estimate", "llama-3-8b", "--zero", "4"], "invalid choice: 4"),
        (["estimate", "llama-3-8b", "--micro-batch", "0"], "positive integer"),
        (["estimate", "llama-3-8b", "--seq-len", "-5"], "positive integer"),
        (["estimate", "llama-3-8b", "--gpus", "0"], "positive integer"),
        (["estimate", "llama-3-8b", "--precision", "fp8"], "fp8"),
        (["estimate", "llama-3-8b", "--gpu-memory", "80XB"], "memory size"),
        (["estimate", "not-a-model"], "llama-3-8b"),  # unknown preset: the known ones are listed
        (["estimate", "missing/config.json"], "no such file"),
        (["estimate", "llama-3-8b", "--attention", "magic"], "magic"),
        (["estimate", "llama-3-8b", "--quantization", "q3_x", "--inference"], "q8_0"),
        (["plan", "llama-3-8b", "--gpu-memory", "80GiB", "--seq-len", "4096"], "--global-batch-tokens"),
        (["plan", "llama-3-8b", "--gpu-memory", "80GiB", "--seq-len", "4096", "--global-batch-tokens", "4Q"],
         "token count"),
        ([], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err
    assert captured.out == ""


def test_console_entry_point_bad_input_subprocess():
    code = "import sys; from lightning_memopt.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "estimate", "llama-3-8b", "--zero", "7"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lightning-memopt estimate: error:")
