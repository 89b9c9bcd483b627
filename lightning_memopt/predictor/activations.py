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
  keeps its input (c N d); in backward one block at a time is recomputed (non-reentrant ``torch.utils.checkpoint``
  frees each recomputed tensor once its backward used it).
* Backward, block by block (traced op by op): the final norm's saved tensors and the labels are gone once its
  backward ran; within a block the candidates for the peak are the MLP output projection's backward, the MLP's
  activation backward (SwiGLU: three intermediate-sized gradients once the product was released) and eager
  attention's softmax backward (two fp32 s x s gradients), each with the block's output gradient.
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
        head_saved: bytes of ``fixed`` freed once the final norm's backward ran (what the final norm saved, the
            loss' labels), so not live through the blocks' backward.
        block_recomputed: bytes a checkpointed block's recomputation adds to its kept input (``block`` less what
            aliases the input: in fp32 the first norm saves the input itself).
        attention_backward: bytes live at a block's attention backward, relative to the whole block saved
            (eager attention's softmax backward; ``None``: never above the MLP's moment).
        forward_attention: activation bytes live at the last checkpointed block's eager softmax in forward (0: not
            a candidate for the peak).
        projection_backward: bytes live at the backward of a block's MLP output projection, relative to the whole
            block saved (the block's output gradient and the projection's input gradient).
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
    head_saved: int = 0
    block_recomputed: "int | None" = None
    attention_backward: "int | None" = None
    forward_attention: int = 0
    projection_backward: int = 0

    @property
    def saved(self) -> int:
        """Bytes saved for backward at the end of forward (activations + logits)."""
        kept = self.checkpointed * self.block_input + (self.num_blocks - self.checkpointed) * self.block
        return kept + self.fixed + self.logits

    def backward_timeline(self) -> "list[tuple[int, int, str]]":
        """(live activation bytes, index of the block whose backward runs, where in it) through backward.

        The block index (-1 = the loss) and the place let the caller add the gradients produced so far and the
        ZeRO-3 parameters gathered then: ``"projection"``, the backward of the block's MLP output projection (its
        weight gathered; before its gradient); ``"mlp"``, the MLP's activation backward (after that gradient, no
        Linear running); ``"attention"``, eager attention's softmax backward (the gradients of everything after
        it). ``num_blocks`` marks the final norm's backward (the output projection's gradients exist, no block's).
        """
        out = [(self.saved + self.logits_backward, -1, "")]
        remaining = self.saved - self.logits
        if self.final_norm_backward:  # the final norm's backward, between the loss and the last block
            out.append((remaining + self.final_norm_backward, self.num_blocks, ""))
        remaining -= self.head_saved
        recomputed = self.block if self.block_recomputed is None else self.block_recomputed
        for i in reversed(range(self.num_blocks)):
            ckpt = i < self.checkpointed
            live = remaining + (recomputed if ckpt else 0)
            if self.projection_backward:
                out.append((live + self.projection_backward, i, "projection"))
            out.append((live + self.block_backward, i, "mlp"))
            if self.attention_backward is not None:
                out.append((live + self.attention_backward, i, "attention"))
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
    zero3: bool = False,
) -> Activations:
    """Activation bytes of one micro-batch of ``spec``.

    ``autocast``: fp32 parameters under ``torch.autocast`` (plain Lightning ``*-mixed``), instead of parameters in
    the compute dtype (DeepSpeed): the residual stream stays fp32 (embeddings and additions are not autocast ops),
    LlamaRMSNorm's upcast is a no-op and its weight product is fp32, and every Linear reading a norm's output saves
    its own cast copy (autocast caches casts of leaf weights only; ``torch/csrc/autograd/autocast_mode``).

    ``zero3``: a DeepSpeed ZeRO-3 run, whose modules get their inputs as new tensors: ``nn.MultiheadAttention``
    then projects q, k and v separately (no packed copy of its input; see ``ModelSpec.packed_projection_params``).

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
        # nn.MultiheadAttention (traced): the input projection's (batch-first transposed) input (cNd), the packed
        # q, k, v (3cNd) and the output projection's input (cNd); SDPA adds its output's log-sum-exp, the eager
        # path (need_weights=True) the scaled q (cNd) and the softmax in the compute dtype
        if attention == "eager":
            # under ZeRO-3 (separate q/k/v projections) the three share the norm's output and q is not kept
            attn = (5 if zero3 else 6) * c * N * d + c * B * heads * S * S
        else:
            attn = 5 * c * N * d + 4 * N * heads
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
    if spec.family == "generic" and spec.norm == "rmsnorm":
        # the attention's input projection saves the first norm's output (counted in ``attn``, as nn.MultiheadAttention
        # saves a batch-first transposed copy)
        attn_norm = norm - c * N * d
    block_input = c * N * d
    if autocast and c < 4:
        block_input = 4 * N * d  # a checkpointed block keeps its fp32 input
        if spec.norm == "rmsnorm" and spec.is_hf and not kern["rms_norm"]:
            core = 8 * N * d + 4 * N  # the fp32 input and normalised tensor, rsqrt
            attn_norm = core + 3 * c * N * d  # q, k and v projections each save a cast copy
            mlp_norm = core + (2 if spec.mlp == "swiglu" else 1) * c * N * d  # gate and up (or fc)
            final_norm = core + c * N * d  # the output projection
    block = attn_norm + mlp_norm + attn + mlp
    # A block's backward peaks in its MLP (traced op by op with utilities/tensor_tracker.py): the block's output
    # gradient (cNd) is live throughout; SwiGLU's product backward holds the intermediate's gradient and the gate's
    # and up's gradients (3cNI) once the product it saved was released (-cNI); Liger's SwiGLU writes its gradients
    # into the tensors it saved, a GELU MLP frees the activation's output as it computes the fc gradient (one cNI).
    if spec.mlp == "swiglu" and not kern["swiglu"]:
        block_backward = c * N * d + 2 * c * N * I
    else:
        block_backward = c * N * d + c * N * I
    projection_backward = c * N * d + c * N * I  # before that: the output projection's backward
    if attention == "eager" and spec.family != "generic":
        # Eager attention's softmax backward can be larger: the MLP, the second norm, the output copy, the
        # repeated values and the softmax's compute-dtype copy were released; live besides the first norm are q
        # and the repeated keys (2cNh_q), the fp32 softmax and, in flight, the output's and the block's gradients
        # (cNh_q + cNd), the fp32 gradient of the softmax and its input's (8 B heads s^2).
        attention_backward = attn_norm + 3 * c * N * hq + c * N * d + 12 * B * heads * S * S - block
    else:
        attention_backward = None
    # The first norm of a recomputed block saves its input itself, unless an RMSNorm (Llama's, torch's composite
    # nn.RMSNorm) upcasts it to a new fp32 tensor (compute dtype below fp32, no autocast): that input is the kept
    # block input, not a second copy.
    upcasts = spec.norm == "rmsnorm" and not (spec.is_hf and kern["rms_norm"]) and c < 4 and not autocast
    block_recomputed = block if upcasts else block - block_input
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
    elif autocast and c < 4:
        # F.cross_entropy on logits[:, :-1] under autocast (an fp32 op): the logits and their shifted copy (c), the
        # fp32 cast and log_softmax's fp32 output; backward holds two fp32 gradients (traced)
        logits, logits_bwd, logits_fwd = 4 * N * V, 8 * N * V, 2 * c * N * V + 8 * N * V
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
    elif spec.family == "generic":
        # the output projection's backward: the logits' gradient (zero-padded back from the shifted slice, cNV) and
        # its input's gradient (cNd), the projection's weight gradients already handed over (traced)
        final_norm_bwd = c * N * V + c * N * d
    else:
        final_norm_bwd = c * N * d
    k = num_checkpointed(activation_checkpointing, spec.num_layers)
    forward_extra = 0
    # The Hugging Face default use_cache=True (off under gradient checkpointing): the DynamicCache concatenates each
    # layer's keys and values into new tensors, held by the model's output until the training step returns the loss.
    # SDPA saves those very tensors; eager attention with grouped KV heads saves its repeated copies instead, so the
    # cached keys and values (2 c N h_kv per layer) come on top; traced with utilities/tensor_tracker.py.
    repeated_kv = attention == "eager" and spec.num_kv_heads != spec.num_heads
    if spec.is_hf and not k and not autocast and repeated_kv:
        forward_extra = spec.num_layers * 2 * c * N * hkv
    if autocast and c < 4 and spec.is_hf:
        # until the model returns: its fp32 final-norm output (last_hidden_state) and, with the Hugging Face default
        # use_cache=True (turned off under gradient checkpointing), the DynamicCache's keys, fp32 after RoPE under
        # autocast (values stay in the compute dtype: the tensors SDPA saved; eager repeats them, so they come on
        # top); measured with utilities/tensor_tracker.py
        per_layer = 4 * N * hkv + (c * N * hkv if repeated_kv else 0)
        cache = spec.num_layers * per_layer if spec.position == "rope" and not k else 0
        forward_extra = 4 * N * d + cache
    if k and attention == "eager" and spec.is_hf:
        # the (B, 1, s, s) causal mask in the hidden states' dtype (fp32 under autocast), an input the checkpointed
        # blocks keep
        fixed += rope_bytes * B * S * S
    forward_attention = 0
    if k and attention == "eager" and spec.is_hf:
        # The last checkpointed block's forward saves nothing but still runs eager attention: besides the kept
        # inputs, its norm's output, q, k (after RoPE, in the hidden states' dtype), v, the repeated k and v, the
        # masked scores (hidden dtype) and the fp32 softmax are live at once (traced as above).
        h_b = rope_bytes
        qkv = h_b * N * (hq + hkv) + c * N * hkv  # q and k after RoPE, v
        repeated = (h_b + c) * N * hq  # the repeated k and v
        transient = h_b * N * d + qkv + repeated + (h_b + 4) * B * heads * S * S
        forward_attention = fixed - final_norm - 8 * N + 8 * S + k * block_input + transient
    # Once the final norm's backward ran, what it saved and the loss' labels (8N) are gone; the position ids (8s)
    # stay. (Plain PyTorch: the final norm's or the output projection's input; the labels are a view of the batch.)
    head_saved = final_norm + 8 * N - 8 * S if spec.family != "generic" else fixed - rope - 8 * N
    return Activations(
        block, block_input, block_backward, k, spec.num_layers, fixed, logits, logits_bwd, logits_fwd,
        final_norm_bwd, forward_extra, head_saved, block_recomputed, attention_backward, forward_attention,
        projection_backward,
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
