"""CUDA's rules against what CUDA did: whole training runs recorded on an NVIDIA H200 (torch 2.11, CUDA 13.0) with
``torch.cuda.memory._record_memory_history`` from process start (``benchmarks/gpu_accuracy.py``, traces group), kept
as fixtures. The ground truth is the caching allocator's own statistics of that run, not anything this package
computes."""

import gzip
import json
from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaForCausalLM

from lightning_memopt import estimate_memory
from lightning_memopt.predictor.account.cuda_allocator import simulate
from lightning_memopt.predictor.device import cuda_rules

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=2816,
             num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
             max_position_embeddings=4096)  # fmt: skip


def recorded(name: str) -> dict:
    with gzip.open(FIXTURES / f"trace_{name}.json.gz", "rt") as f:
        return json.load(f)


def measured(run: dict) -> "tuple[int, int, int]":
    """The run's last step: max allocated, max reserved, and the device's used bytes (``mem_get_info``)."""
    step = run["summary"]["rows"][0]["steps"][-1]
    return step["allocated"], step["reserved"], step["used"]


@pytest.mark.parametrize("name", ["llama_sdpa_0_1", "llama_eager_1_4"])
def test_the_allocator_model_replays_a_recorded_run_to_its_reserved_peak(name):
    """The recorded allocations and frees, replayed: the simulated peaks are the real allocator's."""
    run = recorded(name)
    events, live = [], {}
    for i, e in enumerate(run["events"]):
        if e["a"] == "alloc":
            live[e["addr"]] = i
            events.append(("alloc", i, e["s"]))
        elif e["a"] == "free_completed":
            events.append(("free", live.pop(e["addr"])))
    result = simulate(events)
    allocated, reserved, _ = measured(run)
    assert abs(result.peak_allocated - allocated) / allocated < 0.002
    assert abs(result.peak_reserved - reserved) / reserved < 0.02


def test_a_config_predicted_for_the_h200_matches_what_the_h200_allocated_reserved_and_used():
    """From the config alone, on a CPU: ``max_memory_allocated`` within 0.5 %, ``max_memory_reserved`` within 2 %,
    the device's used memory within 2 % (the run: 1 x 1024 tokens, SDPA, bf16 autocast, torch's foreach AdamW)."""
    est = estimate_memory(LLAMA, micro_batch_size=1, seq_len=1024, attention="sdpa", activation_checkpointing=False,
                          engine="torch", precision="bf16-mixed", optimizer="adamw-foreach", device="NVIDIA H200",
                          expandable_segments=False)  # fmt: skip
    allocated, reserved, used = measured(recorded("llama_sdpa_0_1"))
    assert abs(est.total - allocated) / allocated < 0.005
    assert abs(est.reserved - reserved) / reserved < 0.02
    assert abs(est.device_total - used) / used < 0.02
    assert est.workspaces == 2 * 32 * 2**20  # one cuBLAS workspace per thread (forward, autograd's backward)


def test_the_cpu_answer_has_no_cuda_rows_and_the_module_on_the_cpu_neither():
    est = estimate_memory(LLAMA | {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256},
                          micro_batch_size=1, seq_len=32, engine="torch")  # fmt: skip
    assert (est.workspaces, est.allocator_rounding, est.reserved, est.device_total) == (0, 0, None, None)
    fields = {k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")}
    model = LlamaForCausalLM(AutoConfig.for_model("llama", **{**fields, "num_hidden_layers": 1, "hidden_size": 64,
                                                               "intermediate_size": 128, "num_attention_heads": 4,
                                                               "num_key_value_heads": 2, "vocab_size": 256}))
    import torch

    ids = torch.zeros(1, 16, dtype=torch.long)
    on_cuda = estimate_memory(model, example_batch={"input_ids": ids, "labels": ids}, engine="torch", device="h100")
    assert on_cuda.workspaces == 2 * 32 * 2**20 and on_cuda.reserved >= on_cuda.total


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_h200_zero_rows_allocated_what_the_deepspeed_replay_predicts(stage):
    """MemOptStrategy on one H200 (``benchmarks/gpu_accuracy.py``'s zero group, expandable segments): the last step's
    ``max_memory_allocated`` as the pipeline predicts it from the module alone, DeepSpeed's initialisation and two
    steps replayed through the allocator (ZeRO-3 was 11 % over before: gathered copies counted on one rank, and the
    single-tensor AdamW's temporaries where torch runs foreach). Reserved is predicted, not judged here: -8.8 % to
    +12.2 % on these rows (``benchmarks/deepspeed_reserved.py``)."""
    from deepspeed_reserved import measured, model_and_batch, strategy_config

    model, batch = model_and_batch()
    est = estimate_memory(model, example_batch=batch, zero=stage, precision="bf16-mixed", optimizer="adamw-foreach",
                          deepspeed_config=strategy_config(stage, model), device="NVIDIA H200",
                          expandable_segments=True)  # fmt: skip
    gpu = measured()[(stage, True)]
    assert abs(est.total - gpu["allocated"]) / gpu["allocated"] < 0.001
    assert est.reserved >= est.total and est.details["cuda"]["segments"] >= 1


def test_deepspeed_on_one_gpu_has_its_reserved_predicted_and_offload_says_why_not():
    import torch

    fields = {k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")}
    model = LlamaForCausalLM(AutoConfig.for_model("llama", **{**fields, "num_hidden_layers": 1, "hidden_size": 64,
                                                               "intermediate_size": 128, "num_attention_heads": 4,
                                                               "num_key_value_heads": 2, "vocab_size": 256}))
    ids = torch.zeros(2, 16, dtype=torch.long)
    kw = dict(example_batch={"input_ids": ids, "labels": ids}, device="h100", optimizer="adamw-foreach")
    for zero in (0, 1, 2, 3):
        est = estimate_memory(model, zero=zero, **kw)
        assert est.reserved >= est.total > est.workspaces and est.device_total is None  # no context measured on H100
    offloaded = estimate_memory(model, zero=2, offload_optimizer="cpu", **kw)
    assert offloaded.reserved is None and "offload" in offloaded.details["cuda"]["reserved"]
    two_ranks = estimate_memory(model, zero=2, world_size=2, **kw)
    assert two_ranks.reserved is None and "several ranks" in two_ranks.details["cuda"]["reserved"]


def test_an_unknown_device_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="Expected `device` 'cpu', 'cuda' or a GPU"):
        cuda_rules("tpu")


def test_cuda_kernels_save_what_cuda_saves_where_the_cpu_takes_another_path():
    """Exact saved bytes: dropout keeps a 1-byte mask (CUDA's fused kernel) instead of a noise tensor of the input's
    dtype, autocast's softmax keeps fp32 probabilities, SDPA with dropout keeps the fused kernel's output and
    log-sum-exp instead of the math path's ``s x s`` probabilities, and cross-entropy keeps 16-bit log-probabilities
    and nll_loss's fp32 copy (CUDA's autocast runs its composite) instead of fp32 ones."""
    import torch
    from torch import nn

    from lightning_memopt.predictor.precision import resolve_precision
    from lightning_memopt.predictor.trace.step import trace_step

    class Step(nn.Module):
        def __init__(self, kind: str):
            super().__init__()
            self.kind, self.proj = kind, nn.Linear(64, 64)

        def forward(self, x):
            h = self.proj(x)  # bf16 under autocast: (2, 128, 64)
            if self.kind == "dropout":
                return nn.functional.dropout(h.float(), 0.1, True).sum()
            if self.kind == "softmax":
                return nn.functional.softmax(h, dim=-1).sum()
            if self.kind == "cross_entropy":
                return nn.functional.cross_entropy(h.view(-1, 64), torch.zeros(256, dtype=torch.long))
            q = h.view(2, 4, 128, 16)
            return nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1).sum()

    def saved(kind: str, cuda: bool) -> int:
        return trace_step(Step(kind), torch.zeros(2, 128, 64), resolve_precision("bf16-mixed"), engine="torch",
                          step=lambda m, b: m(b), cuda=cuda).saved_bytes  # fmt: skip

    elements = 2 * 128 * 64
    assert saved("dropout", False) - saved("dropout", True) == elements * (4 - 1)  # fp32 noise -> bool mask
    assert saved("softmax", True) - saved("softmax", False) == elements * (4 - 2)  # probabilities in fp32
    assert saved("sdpa", True) < saved("sdpa", False) - 2 * 4 * 128 * 128  # no s x s probabilities kept
    # fp32 log-probabilities (CPU: the logits cast first) -> 16-bit ones, and nll_loss's fp32 copy of them
    assert saved("cross_entropy", True) - saved("cross_entropy", False) == elements * 2
    assert nn.functional.dropout.__name__ == "dropout" and nn.functional.cross_entropy.__name__ == "cross_entropy"


def test_cuda_softmax_backward_holds_its_temporary_inside_the_op():
    """CUDA's ``_softmax_backward_data`` makes ``grad * output`` before it reduces (``SoftMax.cu``) and frees it as it
    returns: the trace for CUDA counts one more probability-sized tensor at that op, and at no other, and records it
    as a storage freed before the next op (the allocator's replay); the CPU's kernel has none."""
    import torch
    from torch import nn

    from lightning_memopt.predictor.precision import resolve_precision
    from lightning_memopt.predictor.trace.step import trace_step

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)

        def forward(self, x):
            h = self.proj(x)
            return nn.functional.softmax(h @ h.transpose(1, 2), dim=-1).square().sum()

    def trace(cuda: bool):
        return trace_step(Scores(), torch.zeros(2, 256, 64), resolve_precision("32-true"), engine="torch",
                          step=lambda m, b: m(b), cuda=cuda, record=True)  # fmt: skip

    cpu, gpu = trace(False), trace(True)
    probabilities = 2 * 256 * 256 * 4
    differ = [(i, g - c) for i, (c, g) in enumerate(zip(cpu.live, gpu.live, strict=True)) if g != c]
    assert len(differ) == 1 and differ[0][1] == probabilities
    at = differ[0][0]
    assert at > gpu.forward_end
    assert sorted(r[:3] for r in gpu.storages) == sorted([r[:3] for r in cpu.storages] + [(at, at + 1, probabilities)])


def _recorded_and_predicted_step() -> "tuple[list[tuple[str, int]], list[tuple[str, int]]]":
    """The H200's recorded step (the 0.25B Llama, eager, checkpointing, 4 x 1,024 tokens;
    ``cuda_allocator_eager_ckpt_b4``) and the predicted run's second step, from its first storage to its optimizer
    step: ``(alloc | free, bytes)`` in the order the allocator saw them."""
    from lightning_memopt.predictor.account.cuda_replay import model_events
    from lightning_memopt.predictor.read.sources import resolve_source
    from lightning_memopt.predictor.request import make_request
    from lightning_memopt.predictor.trace.timeline import step_timeline

    source = resolve_source(LLAMA)
    request = make_request(micro_batch_size=4, seq_len=1024, attention="eager", activation_checkpointing=True,
                           engine="torch", optimizer="adamw-foreach", device="NVIDIA H200",
                           expandable_segments=False).on(source.device)  # fmt: skip
    recorded = step_timeline(source, request).recorded
    events = model_events(recorded, source.reading, request.precision.param_bytes(request.trace_engine),
                          request.optimizer, request.rules)  # fmt: skip
    sizes = {e[1]: e[2] for e in events if e[0] == "alloc"}
    second = next(i for i, e in enumerate(events) if e[1][0] == 1)
    predicted = [(e[0], sizes[e[1]]) for e in events[second:]]
    with gzip.open(FIXTURES / "cuda_allocator_eager_ckpt_b4.json.gz", "rt") as f:
        trace = json.load(f)["device_traces"][0]
    names = {"alloc": "alloc", "free_completed": "free"}
    return [(names[e["action"]], e["size"]) for e in trace if e["action"] in names], predicted


def test_a_step_allocates_and_frees_its_large_tensors_in_the_order_the_h200_did():
    """Every allocation and free of 64 MiB or more of the recorded H200 step (the attention scores, their fp32
    copies and gradients, the softmax backward's temporary, the logits) against the predicted second step: the same
    532 events, in the same order but for one swap: the H200's loop drops the logits before ``zero_grad`` frees the
    last step's vocabulary-sized gradients, the replay frees the gradients first (both before the backward). Before
    an op's outputs came after the frees ahead of it and the softmax backward's temporary was counted, 59 % of the
    sequence matched."""
    from collections import Counter
    from difflib import SequenceMatcher

    h200, predicted = _recorded_and_predicted_step()
    large = 64 * 2**20
    h200, predicted = [e for e in h200 if e[1] >= large], [e for e in predicted if e[1] >= large]
    assert len(h200) > 500 and Counter(predicted) == Counter(h200)
    assert SequenceMatcher(None, predicted, h200, autojunk=False).ratio() > 0.99


def test_a_step_stages_its_reductions_where_the_h200_did():
    """CUDA's ``sum`` of a norm's weight gradient over 4 x 1,024 tokens stages its blocks' partial sums in a 32 MiB
    buffer, with 32 bytes of semaphores (``Reduce.cuh``; :func:`~.cuda_kernels.reduce_buffers`): the recorded step
    allocates 33 such buffers, two RMSNorms a layer and the final one, and the predicted step the same 33, each
    freed before the next allocation of the step (none before the port)."""
    h200, predicted = _recorded_and_predicted_step()
    buffer = 32 * 2**20

    def staged(events: "list[tuple[str, int]]") -> int:
        return sum(1 for i, e in enumerate(events) if e == ("alloc", buffer) and ("alloc", 32) in events[i + 1:i + 3])

    assert staged(h200) == staged(predicted) == 33
    at = [i for i, e in enumerate(predicted) if e == ("alloc", buffer)]
    assert all(("free", buffer) in predicted[i + 1:i + 4] and predicted[i + 1][0] == "alloc" for i in at)


@pytest.mark.parametrize("row", ["t5:eager:1:4", "vit:eager:1:4"])
def test_a_checkpointed_eager_attention_allocates_and_reserves_what_the_h200_did(row):
    """From the config alone, the rows whose peak is an eager attention's backward under checkpointing, against the
    H200 (``benchmarks/results/gpu_2026-12-04/accuracy_matrix.json``): ``max_memory_allocated`` within 1 % and
    ``max_memory_reserved`` within 2 %. T5 was +4.5 % / +4.0 % while the replay handed an op its outputs before the
    blocks freed ahead of it (a 256 MiB score tensor too many); ViT was then -3.6 % / -5.3 % without the temporary
    CUDA's softmax backward allocates (see the test above)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_accuracy

    matrix = json.loads((Path(gpu_accuracy.__file__).parent / "results" / "gpu_2026-12-04" / "accuracy_matrix.json")
                        .read_text())["matrix"]  # fmt: skip
    run = next(r for r in matrix if r["name"] == row)
    config, _ = gpu_accuracy.KINDS[run["kind"]]
    image = run["kind"] == "vit"
    est = estimate_memory(config, micro_batch_size=run["micro_batch"], seq_len=None if image else gpu_accuracy.SEQ_LEN,
                          attention=run["attention"], activation_checkpointing=run["checkpointing"], engine="torch",
                          precision="bf16-mixed", optimizer="adamw-foreach", device="NVIDIA H200",
                          expandable_segments=False)  # fmt: skip
    allocated, reserved = run["steps"][-1]["allocated"], max(s["reserved"] for s in run["steps"])
    assert abs(est.total - allocated) / allocated < 0.01
    assert abs(est.reserved - reserved) / reserved < 0.02


@pytest.mark.parametrize("row", ["bert:eager:0:4", "bert:sdpa:1:4", "t5:sdpa:0:4", "gemma3:sdpa:0:4"])
def test_a_config_allocates_what_the_h200_allocated_where_cuda_runs_other_kernels(row):
    """From the config alone, on a CPU, within 1 % of the H200's ``max_memory_allocated`` (issue 16: never more than
    1 % under)
    (``benchmarks/results/gpu_2026-12-04/accuracy_matrix.json``, 1024 tokens a sample), where CUDA's kernels keep
    other tensors than the CPU's:

    * BERT's masked-LM loss takes 16-bit logits: CUDA's autocast runs cross-entropy's composite (16-bit
      log-probabilities, an fp32 copy for nll_loss) where the CPU's casts the logits to fp32 first (was +1.5 % and
      +4.6 %);
    * SDPA with a mask (T5's position bias, which needs a gradient; Gemma 3's sliding window) runs CUDA's backend on
      the arguments autocast cast to 16 bits, and the backend's own computation outside autocast (was -13.1 % and
      +3.5 %: fp32 queries handed to the memory-efficient kernel, the math path's fp32 products cast back to 16 bits).
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_accuracy

    matrix = json.loads((Path(gpu_accuracy.__file__).parent / "results" / "gpu_2026-12-04" / "accuracy_matrix.json")
                        .read_text())["matrix"]  # fmt: skip
    run = next(r for r in matrix if r["name"] == row)
    config, _ = gpu_accuracy.KINDS[run["kind"]]
    est = estimate_memory(config, micro_batch_size=run["micro_batch"], seq_len=gpu_accuracy.SEQ_LEN,
                          attention=run["attention"], activation_checkpointing=run["checkpointing"], engine="torch",
                          precision="bf16-mixed", optimizer="adamw-foreach", device="NVIDIA H200",
                          expandable_segments=False)  # fmt: skip
    allocated = run["steps"][-1]["allocated"]
    assert abs(est.total - allocated) / allocated < 0.01
