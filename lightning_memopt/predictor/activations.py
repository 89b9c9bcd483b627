"""Analytic activation and logits bytes of one micro-batch, per block, from the module structure.

The counts follow what autograd saves in the Hugging Face implementations (transformers 5,
``modeling_llama.py``, verified against fake-tensor traces, :mod:`.trace`), in the spirit of Korthikanti et
al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1 (eq. 1: ``sbh(34 +
5as/h)`` bytes per GPT layer), adapted to Llama-style blocks. With N = batch x sequence tokens, d = width, c =
bytes of the compute dtype:

* RMSNorm (``LlamaRMSNorm``): the fp32 upcast of its input (4Nd), ``rsqrt`` (4N), the normalised tensor and
  the weighted output read by the next Linear (2 x cNd).
* Attention, SDPA/flash: q after RoPE (c N h_q), k and v (2 c N h_kv), output (c N h_q), log-sum-exp (4 N
  heads): no s x s term (Dao et al. 2022, "FlashAttention", section 3.1). Eager: q, k transposed and v
  repeated to all heads (3 c N h_q), fp32 softmax (4 B heads s^2, ``softmax(dtype=float32)``) and its cast (c
  B heads s^2 when c < 4), the output copy (c N h_q). RoPE saves only cos/sin (2 c s head_dim, shared by all
  layers).
* SwiGLU MLP: gate, up, SiLU(gate) and the product (4 c N I). GELU MLP: fc output, GELU output (2 c N I).
* Logits: Hugging Face losses upcast logits to fp32; ``log_softmax`` saves 4NV and its backward briefly holds
  two more 4NV tensors. Liger's fused linear cross-entropy never materialises them (Hsu et al. 2024, "Liger
  Kernel", section 3.3): about ``N d`` fp32 gradient chunk instead.
* Checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a checkpointed block
  keeps its input (c N d); in backward one block at a time is recomputed.
"""

from dataclasses import dataclass
from typing import Any

from lightning_memopt.predictor.model_spec import ModelSpec

ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
LIGER_KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch.

    Attributes:
        block: bytes one block saves for backward.
        block_input: bytes a checkpointed block keeps (its input).
        block_backward: extra bytes live while one block runs backward (output gradient and temporaries).
        checkpointed: number of checkpointed blocks.
        num_blocks: number of blocks.
        fixed: bytes saved outside the blocks (final norm, RoPE tables, labels).
        logits: logits bytes saved for backward.
        logits_backward: extra logits bytes at the start of backward (the loss' gradients).
        logits_forward: logits bytes live as the loss is computed (end of forward).
        final_norm_backward: bytes the final norm's backward adds to the activations saved before it, once the
            logits and the output projection's input were freed.
        forward_extra: bytes live only while the loss is computed (what the model's output object holds besides
            the logits), freed when the training step returns it.
    """

    block: int
    block_input: int
    block_backward: int
    checkpointed: int
    num_blocks: int
    fixed: int
    logits: int
    logits_backward: int
    logits_forward: int = 0
    final_norm_backward: int = 0
    forward_extra: int = 0

    @property
    def saved(self) -> int:
        """Bytes saved for backward at the end of forward (activations + logits)."""
        kept = self.checkpointed * self.block_input + (self.num_blocks - self.checkpointed) * self.block
        return kept + self.fixed + self.logits

    def backward_timeline(self) -> "list[tuple[int, int]]":
        """(live activation bytes, index of the block whose backward runs; -1 = the loss) through backward.

        The block index lets the caller add the gradients produced so far; ``num_blocks`` marks the final norm's
        backward (the output projection's gradients exist, no block's yet).
        """
        out = [(self.saved + self.logits_backward, -1)]
        remaining = self.saved - self.logits
        if self.final_norm_backward:  # the final norm's backward, between the loss and the last block
            out.append((remaining + self.final_norm_backward, self.num_blocks))
        for i in reversed(range(self.num_blocks)):
            ckpt = i < self.checkpointed
            live = remaining + (self.block if ckpt else 0) + self.block_backward
            out.append((live, i))
            remaining -= self.block_input if ckpt else self.block
        return out


def _liger(liger: "bool | dict[str, bool]") -> "dict[str, bool]":
    if isinstance(liger, bool):
        return {k: liger for k in LIGER_KERNELS}
    if isinstance(liger, dict):
        unknown = set(liger) - set(LIGER_KERNELS)
        if unknown:
            raise ValueError(
                f"Expected liger kernel switches among {LIGER_KERNELS}, got unknown {sorted(unknown)}."
            )
        out = {k: bool(liger.get(k, False)) for k in LIGER_KERNELS}
        return out
    raise TypeError(
        f"Expected `liger` to be a bool or a dict of kernel switches, got {type(liger).__name__}."
    )


def num_checkpointed(activation_checkpointing: "bool | float | int", num_blocks: int) -> int:
    """Blocks checkpointed for ``True``/``False``, a fraction in (0, 1] or a count.

    Example:
        >>> num_checkpointed(0.5, 32), num_checkpointed(True, 32), num_checkpointed(3, 32)
        (16, 32, 3)
    """
    if isinstance(activation_checkpointing, bool):
        return num_blocks if activation_checkpointing else 0
    if isinstance(activation_checkpointing, float):
        if not 0.0 < activation_checkpointing <= 1.0:
            raise ValueError(f"Expected a checkpointed fraction in (0, 1], got {activation_checkpointing!r}.")
        return int(round(activation_checkpointing * num_blocks))
    if isinstance(activation_checkpointing, int):
        if activation_checkpointing < 0:
            raise ValueError(
                f"Expected a non-negative number of checkpointed blocks, got {activation_checkpointing}."
            )
        return min(activation_checkpointing, num_blocks)
    raise TypeError(
        "Expected `activation_checkpointing` to be a bool, a fraction in (0, 1] or a number of blocks, got"
        f" {type(activation_checkpointing).__name__}."
    )


def activation_bytes(
    spec: ModelSpec,
    *,
    micro_batch_size: int,
    seq_len: int,
    compute_bytes: int,
    attention: str = "sdpa",
    activation_checkpointing: "bool | float | int" = False,
    liger: "bool | dict[str, bool]" = False,
    autocast: bool = False,
) -> Activations:
    """Activation bytes of one micro-batch of ``spec``.

    ``autocast``: fp32 parameters under ``torch.autocast`` (plain Lightning ``*-mixed``), instead of parameters in
    the compute dtype (DeepSpeed): the residual stream stays fp32 (embeddings and additions are not autocast ops),
    LlamaRMSNorm's upcast is a no-op and its weight product is fp32, and every Linear reading a norm's output saves
    its own cast copy (autocast caches casts of leaf weights only; ``torch/csrc/autograd/autocast_mode``).

    Example:
        >>> from lightning_memopt.predictor.model_spec import resolve_model
        >>> spec = resolve_model("llama-3-8b")
        >>> act = activation_bytes(spec, micro_batch_size=1, seq_len=4096, compute_bytes=2)
        >>> round(act.saved / 2**30, 2)
        26.6
    """
    if not spec.has_structure:
        return Activations(0, 0, 0, 0, 0, 0, 0, 0, 0)
    kern = _liger(liger)
    B, S, c = micro_batch_size, seq_len, compute_bytes
    N = B * S
    d, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size  # noqa: E741 (the papers' names)
    hq, hkv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    heads = spec.num_heads
    if spec.norm == "rmsnorm" and spec.is_hf:
        # LlamaRMSNorm: x.float() (4Nd; the input itself in fp32), rsqrt (4N), normalised and weighted (2
        # cNd);
        # Liger's RMSNorm saves its input and the fp32 rstd and writes one output (Liger ops/rms_norm.py).
        norm = (2 * c * N * d + 4 * N) if kern["rms_norm"] else (4 * N * d + 2 * c * N * d + 4 * N)
    elif spec.norm == "rmsnorm":
        # torch nn.RMSNorm (composite on CPU): fp32 input and normalised (2 x 4Nd), rsqrt (4N), output (cNd)
        norm = (8 + c) * N * d + 4 * N
    else:
        norm = 2 * c * N * d + 8 * N  # LayerNorm: input, mean and rstd (fp32), output read by the Linear
    if spec.family == "generic":
        # nn.MultiheadAttention-style: packed qkv projection (3cNd), scaled q (cNd), output (cNd); eager keeps
        # the
        # softmax in the compute dtype, SDPA its log-sum-exp
        attn = 5 * c * N * d + (c * B * heads * S * S if attention == "eager" else 4 * N * heads)
    elif attention == "eager":
        probs = 4 * B * heads * S * S + (c * B * heads * S * S if c < 4 else 0)
        attn = 4 * c * N * hq + probs
    else:
        attn = 2 * c * N * hq + 2 * c * N * hkv + 4 * N * heads
    if spec.mlp == "swiglu":
        mlp = 2 * c * N * I if kern["swiglu"] else 4 * c * N * I  # Liger SwiGLU recomputes SiLU in backward
    else:
        mlp = 2 * c * N * I
    attn_norm = mlp_norm = final_norm = norm
    block_input = c * N * d
    if autocast and c < 4:
        block_input = 4 * N * d  # a checkpointed block keeps its fp32 input
        if spec.norm == "rmsnorm" and spec.is_hf and not kern["rms_norm"]:
            core = 8 * N * d + 4 * N  # the fp32 input and normalised tensor, rsqrt
            attn_norm = core + 3 * c * N * d  # q, k and v projections each save a cast copy
            mlp_norm = core + (2 if spec.mlp == "swiglu" else 1) * c * N * d  # gate and up (or fc)
            final_norm = core + c * N * d  # the output projection
    block = attn_norm + mlp_norm + attn + mlp
    block_backward = c * N * I  # the gradient of the MLP intermediate, as the first weight gradient appears
    # RoPE's cos/sin take the hidden states' dtype (fp32 under autocast)
    rope_bytes = 4 if autocast else c
    rope = 2 * rope_bytes * S * spec.head_dim if spec.position == "rope" and not kern["rope"] else 0
    if spec.family == "generic":
        has_final_norm = any(
            ("norm" in n or n.split(".")[-1].startswith("ln")) and not any(ch.isdigit() for ch in n)
            for n, _ in spec.module_params
        )
        fixed = (norm if has_final_norm else c * N * d) + rope + 8 * N
    else:
        fixed = final_norm + rope + 8 * N
    if kern["fused_linear_cross_entropy"]:
        logits, logits_bwd, logits_fwd = 0, 4 * N * d, 4 * N * d
    elif spec.is_hf:
        # logits (c), their fp32 upcast (a no-op in fp32) and log_softmax's output are live as the loss ends
        logits, logits_bwd = 4 * N * V, 8 * N * V
        logits_fwd = 4 * N * V + (c * N * V if c < 4 else 0) + 4 * N * V
    else:
        # F.cross_entropy on logits[:, :-1]: the logits, their shifted copy and log_softmax's output (all c)
        logits, logits_bwd, logits_fwd = c * N * V, 2 * c * N * V, 3 * c * N * V
    if kern["cross_entropy"] and not kern["fused_linear_cross_entropy"]:
        logits_bwd = 0  # Liger's cross-entropy writes the gradient into the logits in place
    # The final norm's backward runs after the logits are freed. LlamaRMSNorm's composite backward (CPU and
    # CUDA alike: it is plain autograd of ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``) upcasts the
    # incoming gradient to fp32 (4Nd) and holds four more fp32 (N, d) temporaries at once (16Nd), after freeing
    # the two compute-dtype tensors its weight product and the output projection saved (2cNd); measured with
    # utilities/tensor_tracker.py. Other norms (fused LayerNorm, Liger) write one gradient (cNd).
    if spec.norm == "rmsnorm" and spec.is_hf and not kern["rms_norm"]:
        final_norm_bwd = 20 * N * d - 2 * c * N * d
    else:
        final_norm_bwd = c * N * d
    k = num_checkpointed(activation_checkpointing, spec.num_layers)
    forward_extra = 0
    if autocast and c < 4 and spec.is_hf:
        # until the model returns: its fp32 final-norm output (last_hidden_state) and, with the Hugging Face default
        # use_cache=True (turned off under gradient checkpointing), the DynamicCache's keys, fp32 after RoPE under
        # autocast (values stay in the compute dtype and are the tensors attention saved); measured with
        # utilities/tensor_tracker.py
        cache = spec.num_layers * 4 * N * hkv if spec.position == "rope" and not k else 0
        forward_extra = 4 * N * d + cache
    if k and attention == "eager" and spec.is_hf:
        fixed += c * B * S * S  # the (B, 1, s, s) causal mask, an input the checkpointed blocks keep
    return Activations(
        block, block_input, block_backward, k, spec.num_layers, fixed, logits, logits_bwd, logits_fwd,
        final_norm_bwd, forward_extra,
    )


def describe(act: Activations) -> "dict[str, Any]":
    """The numbers as a dict for ``MemoryEstimate.details``."""
    return {
        "block_bytes": act.block,
        "block_input_bytes": act.block_input,
        "checkpointed_blocks": act.checkpointed,
        "saved_bytes": act.saved,
        "logits_bytes": act.logits,
    }
