"""`lightning-memopt estimate` and `plan`: output, JSON in bytes, exit code 2 with one line on bad input."""

import json
import subprocess
import sys

import pytest

from lightning_memopt.cli import main
from lightning_memopt.cli.estimate import parse_count, parse_model
from lightning_memopt.planning import estimate_memory
from lightning_memopt.planning.quantized import estimate_quantized


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


@pytest.mark.slow  # a full-size preset at every stage, seconds each: `make test-slow` (CI runs it)
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
    proc = subprocess.run([sys.executable, "-c", code, "estimate", "llama-3-8b", "--zero", "7"], check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lightning-memopt estimate: error:")


def _json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_defaults_are_the_predictor_defaults(capsys):
    data = _json(capsys, ["estimate", "llama-3-8b", "--seq-len", "2048"])
    assert data["total"] == estimate_memory("llama-3-8b", seq_len=2048).total


def test_engine_zero_paper(capsys):
    data = _json(capsys, ["estimate", "7.5e9", "--gpus", "64", "--zero", "1", "--precision", "16-mixed", "--engine",
                          "zero-paper"])  # fmt: skip
    expected = estimate_memory("7.5e9", world_size=64, zero=1, precision="16-mixed", engine="zero-paper")
    assert data["total"] == expected.total and data["details"]["engine"] == "zero-paper"


def test_lora_rank_counts_with_quantization(capsys):
    argv = ["estimate", "llama-3-8b", "--quantization", "nf4", "--seq-len", "1024"]
    small, large = (_json(capsys, [*argv, "--lora-rank", r]) for r in ("8", "64"))
    assert large["parameters"] > small["parameters"]
    assert small["parameters"] == estimate_quantized("llama-3-8b", "nf4", mode="qlora", seq_len=1024,
                                                     lora_rank=8).parameters  # fmt: skip


def test_lora_on_a_16bit_base_is_the_what_if_estimate(capsys):
    argv = ["estimate", "llama-3-8b", "--seq-len", "512", "--lora-rank", "16", "--lora-targets", "q_proj,v_proj"]
    data = _json(capsys, argv)
    expected = estimate_memory("llama-3-8b", seq_len=512, lora_rank=16, lora_targets=["q_proj", "v_proj"])
    assert data["total"] == expected.total and data["details"]["lora_rank"] == 16
    assert data["details"]["trainable_parameters"] == 32 * 16 * (4096 + 4096 + 4096 + 1024)  # A and B of q and v
    assert main(argv[:-2]) == 0 and "LoRA rank 16" in capsys.readouterr().out.splitlines()[0]


def test_the_table_says_what_was_estimated(capsys):
    assert main(["estimate", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--micro-batch", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("llama-3.1-8b (8.03B parameters), 8 GPU(s), ZeRO-3 (deepspeed), micro-batch 2 x 131072 tokens,"
                     " bf16-mixed")  # fmt: skip


def test_plan_with_plain_torch_searches_no_zero_stage(capsys):
    data = _json(capsys, ["plan", "gpt2", "--engine", "torch", "--gpu-memory", "24GiB", "--seq-len", "1024",
                          "--global-batch-tokens", "512k"])  # fmt: skip
    assert data["zero"] == 0 and not data["offload_optimizer"] and data["estimate"]["details"]["engine"] == "torch"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["estimate", "llama-3-8b", "--quantization", "q8_0", "--inference", "--lora-rank", "8"], "--lora-rank"),
        (["estimate", "llama-3-8b", "--inference"], "--inference"),
        (["estimate", "llama-3-8b", "--quantization", "nf4", "--seq-len", "512", "--gpus", "8"], "--gpus"),
        (["estimate", "llama-3-8b", "--quantization", "nf4", "--seq-len", "512", "--zero", "3"], "--zero"),
        (["estimate", "llama-3-8b", "--quantization", "nf4", "--seq-len", "512", "--engine", "torch"], "--engine"),
        (["estimate", "llama-3-8b", "--quantization", "q8_0", "--inference", "--optimizer", "sgd"], "--optimizer"),
        (["estimate", "llama-3-8b", "--quantization", "q8_0", "--inference", "--checkpointing"], "--checkpointing"),
        (["estimate", "8B", "--seq-len", "4096"], "--seq-len"),
        (["estimate", "8B", "--micro-batch", "4"], "--micro-batch"),
        (["estimate", "8B", "--attention", "eager"], "--attention"),
        (["estimate", "llama-3-8b", "--margin", "0.2"], "--margin"),
        (["plan", "gpt2", "--engine", "torch", "--zero-stages", "2", "--gpu-memory", "8GiB", "--seq-len", "512",
          "--global-batch-tokens", "1M"], "--zero-stages"),
        (["plan", "gpt2", "--no-offload", "--offload-device", "nvme", "--gpu-memory", "8GiB", "--seq-len", "512",
          "--global-batch-tokens", "1M"], "--offload-device"),
    ],
)
def test_an_option_without_effect_is_an_error(argv, option, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lightning-memopt: error: Expected {option} only ") and "Fix:" in err and "\n" not in err
