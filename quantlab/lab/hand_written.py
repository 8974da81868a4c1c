"""The hand-written steps of chapter 06's fastest recipes, which the lab applies (results/README.md tells their story).

- `FlashAttention3Processor`: diffusers' FLUX attention with FlashAttention-3 (bf16, or fp8 q, k and v) in the
  middle; with `rope_kernel=True`, `kernels.qk_norm_rope_fp8` computes what comes between the fused QKV
  projection and FA3.
- `use_sigmoid_gelu`: GELU's tanh form computed as x·σ(2z), the same function, which inductor compiles faster.
- `use_single_block_kernels`: the single-stream blocks' LayerNorm and GELU, each with its fp8 casts, in two
  Triton kernels, with the Linears run on fp8 inputs by `torch._scaled_mm`; `fuse_single_block_projections`
  then runs each block's QKV and MLP projections as one matmul with row-wise scales.

`HAND_WRITTEN` hands them to `quantlab.speed.apply_speedups`, which calls them at their place in the order.
"""

from __future__ import annotations

from typing import Any

import torch

from ..recipes import Speedups
from . import kernels

__all__ = [
    "HAND_WRITTEN",
    "FlashAttention3Processor",
    "SigmoidGELU",
    "fuse_single_block_projections",
    "gelu_tanh_via_sigmoid",
    "join_qkv_mlp_weights",
    "joined_qkv_mlp_linear",
    "static_fp8_linear",
    "use_sigmoid_gelu",
    "use_single_block_kernels",
]


class FlashAttention3Processor:
    """diffusers' FLUX attention processor, with the attention itself computed by FlashAttention-3.

    Everything before and after the attention call is what diffusers' `FluxAttnProcessor` does, step
    for step (tests/test_speed.py checks that the outputs are identical): the (fused) QKV projections,
    RMSNorm on q and k, the text and image streams joined, RoPE, the output projections. With
    `fp8=True`, q, k and v are cast to float8 e4m3 first, without scales, as flux-fast does: after the
    RMSNorm, q and k sit far inside e4m3's ±448 (v is not normalized: the cast clips it there). FA3
    then runs both attention matmuls in fp8 on Hopper's tensor cores (twice the bf16 rate) and returns
    bf16. Install it on every attention layer with
    `transformer.set_attn_processor(FlashAttention3Processor(fp8=True))`. With `rope_kernel=True` too, and
    fused projections, the RMSNorms, the RoPE and the casts run in one Triton kernel instead
    (`kernels.qk_norm_rope_fp8`), which rounds where diffusers' code does.
    """

    _attention_backend = None  # diffusers' set_attention_backend() sets these on every processor;
    _parallel_config = None  # this one always calls FA3, and runs on one GPU

    def __init__(self, fp8: bool = False, rope_kernel: bool = False):
        if rope_kernel and not fp8:
            raise ValueError("rope_kernel=True writes q, k and v in fp8: use it with fp8=True.")
        self.fp8 = fp8
        self.rope_kernel = rope_kernel

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention over (batch, tokens, heads, head_dim) tensors, returned in the same layout."""
        from fa3_fwd_interface import flash_attn_func

        if self.fp8:
            query, key, value = (x.to(torch.float8_e4m3fn) for x in (query, key, value))
        return flash_attn_func(query, key, value)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if attention_mask is not None:
            raise ValueError("FlashAttention3Processor takes no attention mask; FLUX.1 passes none.")
        qkv = (self._rope_kernel_qkv if self.rope_kernel else self._unfused_qkv)(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        hidden_states = self.attention(*qkv).flatten(2, 3).to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    @staticmethod
    def _rope_kernel_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """fp8 q, k and v from the fused projections, by `kernels.qk_norm_rope_fp8` (one Triton kernel per stream)."""
        if not attn.fused_projections or image_rotary_emb is None:
            raise ValueError("rope_kernel=True reads the fused QKV projection and applies FLUX's rotary embedding: "
                             "call transformer.fuse_qkv_projections() first, and pass image_rotary_emb.")
        text = ()
        if attn.added_kv_proj_dim is not None:  # a double-stream block: the text stream goes first
            text = (attn.to_added_qkv(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
        return kernels.qk_norm_rope_fp8(attn.to_qkv(hidden_states), attn.norm_q, attn.norm_k, image_rotary_emb,
                                        attn.heads, *text)

    @staticmethod
    def _unfused_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """q, k and v for the attention call, by diffusers' steps: projections, RMSNorms, streams joined, RoPE."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # a double-stream block: the text stream goes first
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value


def _keep_fp8_operands(linear: torch.nn.Module) -> None:
    """Put a static-fp8 Linear's `torch._scaled_mm` operands on it as plain buffers (views; nothing is copied)."""
    weight = linear.weight
    linear.register_buffer("fp8_weight_t", weight.qdata.t(), persistent=False)  # column-major, as cuBLAS wants it
    linear.register_buffer("fp8_weight_scale", weight.scale.reshape(1, 1), persistent=False)
    linear.register_buffer("fp8_input_scale", weight.act_quant_scale.reshape(1, 1), persistent=False)
    linear.fp8_fast_accumulation = weight.mm_config.use_fast_accum


def _check_bf16_for_single_block_kernels(transformer: torch.nn.Module) -> None:
    if transformer.dtype != torch.bfloat16:
        raise ValueError(f"single-block-kernels round as PyTorch does on bf16 activations, and this transformer is "
                         f"{transformer.dtype}. Instead: load it in bf16, or leave out single-block-kernels.")


def _single_block_kernels_problem(block: torch.nn.Module) -> str | None:
    """Why `_single_block_with_kernels` cannot run `block` (a FluxSingleTransformerBlock), or None."""
    processor = block.attn.processor
    if not (block.attn.fused_projections and isinstance(processor, FlashAttention3Processor)
            and processor.rope_kernel):
        return ("single-block-kernels hands the fused QKV projection to the rope kernel: call "
                "transformer.fuse_qkv_projections(), then set FlashAttention3Processor(fp8=True, rope_kernel=True), "
                "then quantize with float8static-tensor.")
    act = block.act_mlp
    if not (isinstance(act, SigmoidGELU) or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh")):
        return f"gelu_cat_fp8 computes GELU's tanh form, which FLUX runs, and this block's MLP runs {act}."
    for linear in (block.attn.to_qkv, block.proj_mlp, block.proj_out):
        weight, scale = linear.weight, getattr(linear.weight, "act_quant_scale", None)
        if scale is None or scale.numel() != 1 or weight.scale.numel() != 1:
            return ("single-block-kernels quantizes each Linear's input with the one static scale that torchao's "
                    "Float8StaticActivationFloat8WeightConfig found for it, and this Linear's weight is a "
                    f"{type(weight).__name__}. Instead: quantize with float8static-tensor first.")
    return None


def static_fp8_linear(x: torch.Tensor, linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`linear(x)` for an `x` already in fp8, quantized with the Linear's static input scale: what torchao
    runs after quantizing the input itself (`addmm_float8_unwrapped_inference`: `torch._scaled_mm`), in `dtype`."""
    from torchao.float8.inference import addmm_float8_unwrapped_inference

    out = addmm_float8_unwrapped_inference(x.reshape(-1, x.shape[-1]), linear.fp8_input_scale, linear.fp8_weight_t,
                                           linear.fp8_weight_scale, output_dtype=dtype, bias=linear.bias,
                                           use_fast_accum=linear.fp8_fast_accumulation)
    return out.view(*x.shape[:-1], out.shape[-1])


def _single_block_with_kernels(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                               temb: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                               joint_attention_kwargs: dict[str, Any] | None = None):
    """diffusers' `FluxSingleTransformerBlock.forward`, step for step, with its elementwise work in Triton kernels.

    The three Triton kernels do what torch.compile would fuse: `kernels.layer_norm_modulate_fp8` the
    joining of the streams, the norm, the modulation and the quantization of both Linears' input;
    `kernels.qk_norm_rope_fp8` what comes between the QKV projection and the attention;
    `kernels.gelu_cat_fp8` the GELU, the concatenation and the output projection's quantization. The
    three Linears then run on fp8 inputs (`static_fp8_linear`; after `fuse_single_block_projections`,
    the first two as one matmul, `joined_qkv_mlp_linear`) and the attention is the processor's own.
    """
    if joint_attention_kwargs:
        raise ValueError("single-block-kernels runs FLUX's attention without extra arguments (no LoRA scale, no "
                         "IP-Adapter); leave out single-block-kernels to pass joint_attention_kwargs.")
    attn, text_tokens, dtype = block.attn, encoder_hidden_states.shape[1], hidden_states.dtype
    shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)  # AdaLayerNormZeroSingle's
    one_matmul = hasattr(block, "fp8_qkv_mlp_weight_t")  # fuse_single_block_projections: one input, one matmul
    linears = (attn.to_qkv,) if one_matmul else (attn.to_qkv, block.proj_mlp)
    residual, *normed = kernels.layer_norm_modulate_fp8(encoder_hidden_states, hidden_states, shift, scale,
                                                        tuple(linear.fp8_input_scale for linear in linears),
                                                        eps=block.norm.norm.eps)
    if one_matmul:
        qkv, mlp = joined_qkv_mlp_linear(normed[0], block, dtype)
    else:
        qkv, mlp = (static_fp8_linear(x, linear, dtype) for x, linear in zip(normed, linears))
    query, key, value = kernels.qk_norm_rope_fp8(qkv, attn.norm_q, attn.norm_k, image_rotary_emb, attn.heads)
    attention = attn.processor.attention(query, key, value).flatten(2, 3).to(dtype)
    for_out = kernels.gelu_cat_fp8(attention, mlp, block.proj_out.fp8_input_scale)
    hidden_states = residual + gate.unsqueeze(1) * static_fp8_linear(for_out, block.proj_out, dtype)
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def use_single_block_kernels(transformer: torch.nn.Module) -> int:
    """Run every single-stream block of `transformer` with `_single_block_with_kernels`; returns how many changed.

    Needs what the kernels read: static fp8 weights (`float8static-tensor`: each Linear's input scale is
    known before the block runs), the fused QKV projection, and `FlashAttention3Processor(fp8=True,
    rope_kernel=True)`. The Linears keep their torchao weights; each also gets its operands for
    `torch._scaled_mm` as buffers that share the weight's memory. A second call changes nothing.
    """
    import types

    _check_bf16_for_single_block_kernels(transformer)
    blocks = [block for block in transformer.single_transformer_blocks if "forward" not in block.__dict__]
    problem = next(filter(None, map(_single_block_kernels_problem, blocks)), None)  # all checked, then changed
    if problem:
        raise ValueError(problem)
    for block in blocks:
        for linear in (block.attn.to_qkv, block.proj_mlp, block.proj_out):
            _keep_fp8_operands(linear)
        block.forward = types.MethodType(_single_block_with_kernels, block)
    return len(blocks)


def joined_qkv_mlp_linear(x: torch.Tensor, block: torch.nn.Module,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`block.attn.to_qkv(x)` and `block.proj_mlp(x)` for an `x` already in fp8, in one `torch._scaled_mm`.

    The matmul reads the joined weights that `fuse_single_block_projections` put on the block, with
    row-wise scales: one per output feature, each its own Linear's per-tensor weight scale, and one
    per token, each the shared static input scale. It returns two views of one output.
    """
    rows = x.reshape(-1, x.shape[-1])
    out = torch._scaled_mm(rows, block.fp8_qkv_mlp_weight_t,
                           scale_a=block.attn.to_qkv.fp8_input_scale.expand(rows.shape[0], 1).contiguous(),
                           scale_b=block.fp8_qkv_mlp_weight_scale, bias=block.fp8_qkv_mlp_bias, out_dtype=dtype,
                           use_fast_accum=block.attn.to_qkv.fp8_fast_accumulation)
    return out.view(*x.shape[:-1], out.shape[-1]).split_with_sizes(block.fp8_qkv_mlp_widths, dim=-1)


def join_qkv_mlp_weights(block: torch.nn.Module) -> None:
    """Join the fp8 weights of `block.attn.to_qkv` and `block.proj_mlp` in memory, for `joined_qkv_mlp_linear`.

    Both Linears need torchao's static fp8 weights (`float8static-tensor`). Each Linear's torchao
    weight then views its rows of the joined weight, so nothing is stored twice and either Linear still
    runs alone; each also gets its `torch._scaled_mm` operands (`_keep_fp8_operands`), as views of the
    joined weight, for `static_fp8_linear`. The views share memory only where they are: moving the
    block to another device afterwards (`.to()`) copies each of them apart.
    """
    linears = (block.attn.to_qkv, block.proj_mlp)
    joined = torch.cat([linear.weight.qdata for linear in linears])
    for linear, rows in zip(linears, joined.split_with_sizes([linear.out_features for linear in linears])):
        linear.weight.qdata = rows
        _keep_fp8_operands(linear)
    scales = [linear.fp8_weight_scale.float().reshape(1).expand(linear.out_features) for linear in linears]
    bias = None
    if any(linear.bias is not None for linear in linears):  # FLUX's have biases; a missing one adds zeros
        dtype = next(linear.bias.dtype for linear in linears if linear.bias is not None)
        bias = torch.cat([linear.bias if linear.bias is not None else joined.new_zeros(linear.out_features,
                                                                                       dtype=dtype)
                          for linear in linears])
    block.register_buffer("fp8_qkv_mlp_weight_t", joined.t(), persistent=False)
    block.register_buffer("fp8_qkv_mlp_weight_scale", torch.cat(scales).reshape(1, -1), persistent=False)
    block.register_buffer("fp8_qkv_mlp_bias", bias, persistent=False)
    block.fp8_qkv_mlp_widths = tuple(linear.out_features for linear in linears)


def _joined_projections_problem(index: int, block: torch.nn.Module) -> str | None:
    """Why `fuse_single_block_projections` cannot join the projections of single-stream block `index`, or None."""
    forward = block.__dict__.get("forward")
    if getattr(forward, "__func__", None) is not _single_block_with_kernels:
        return (f"Single-stream block {index} runs diffusers' own forward, which calls to_qkv and proj_mlp one by "
                "one; fused-qkv-mlp's joined matmul needs the single-block kernels' forward. Instead: call "
                "use_single_block_kernels(transformer) first (the single-block-kernels step).")
    qkv, mlp = block.attn.to_qkv.fp8_input_scale, block.proj_mlp.fp8_input_scale
    if not torch.equal(qkv, mlp):
        return (f"fused-qkv-mlp quantizes the normalized tokens once for both projections, and calibration found "
                f"different input scales for them in single-stream block {index} ({qkv.item():.6g} and "
                f"{mlp.item():.6g}). Instead: calibrate both on the same inputs (apply_speed_recipe does), or "
                "leave out fused-qkv-mlp.")
    return None


def fuse_single_block_projections(transformer: torch.nn.Module) -> int:
    """Run each single-stream block's QKV and MLP projections as one fp8 matmul; returns how many blocks changed.

    Both Linears read the same normalized tokens (BFL's FLUX code holds them as one Linear, `linear1`),
    so static fp8 calibrated one input scale for both, and one fp8 copy of the tokens serves both: the
    LayerNorm kernel writes one output instead of two. `joined_qkv_mlp_linear` then runs the matmul
    with row-wise scales, so each Linear keeps the weight scale torchao gave it: the same products.
    Needs `use_single_block_kernels` first. Every block is checked before any changes; a second call
    changes nothing.
    """
    blocks = {index: block for index, block in enumerate(transformer.single_transformer_blocks)
              if not hasattr(block, "fp8_qkv_mlp_weight_t")}
    problem = next(filter(None, (_joined_projections_problem(index, block) for index, block in blocks.items())), None)
    if problem:
        raise ValueError(problem)
    for block in blocks.values():
        join_qkv_mlp_weights(block)
    return len(blocks)


# GELU's tanh approximation is 0.5·x·(1 + tanh(z)) with z = √(2/π)·(x + 0.044715·x³). Since
# 1 + tanh(z) = 2σ(2z), it is also x·σ(2z): the same function, which FLUX runs after every MLP's first
# Linear. The two forms differ in what inductor generates for them: tanh becomes a call of libdevice's
# tanh, a longer instruction sequence, and σ one fast exponential and a division.
_TWO_SQRT_2_OVER_PI = 2 * (2 / 3.141592653589793) ** 0.5


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` as x·σ(2z): in float32 for 16-bit x, returned in x's dtype."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (wide * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (wide + 0.044715 * wide * wide * wide))).to(x.dtype)


class SigmoidGELU(torch.nn.Module):
    """`nn.GELU(approximate="tanh")` as x·σ(2z) (`gelu_tanh_via_sigmoid`), for a compiled model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_via_sigmoid(x)


def use_sigmoid_gelu(transformer: torch.nn.Module) -> int:
    """Compute every tanh GELU of `transformer` as x·σ(2z); returns how many were changed (0 the second time).

    The single-stream blocks hold an `nn.GELU` (`act_mlp`), which is replaced by a SigmoidGELU; the
    feed-forwards of the double-stream blocks hold diffusers' `GELU`, whose projection stays and whose
    `gelu` method is replaced on the instance.
    """
    from diffusers.models.activations import GELU as DiffusersGELU

    changed = 0
    for name, module in list(transformer.named_modules()):
        if isinstance(module, torch.nn.GELU) and module.approximate == "tanh":
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, SigmoidGELU())
            changed += 1
        elif (isinstance(module, DiffusersGELU) and module.approximate == "tanh"
              and module.__dict__.get("gelu") is not gelu_tanh_via_sigmoid):
            module.gelu = gelu_tanh_via_sigmoid
            changed += 1
    return changed


class _HandWritten:
    """The hand-written steps, as `quantlab.speed.apply_speedups` calls them (`speed.HandWritten`)."""

    def attention_processor(self, steps: Speedups) -> FlashAttention3Processor:
        return FlashAttention3Processor(fp8=steps.attention == "fa3-fp8", rope_kernel=steps.rope_kernel)

    def check(self, transformer: torch.nn.Module, steps: Speedups) -> None:
        if steps.single_block_kernels:  # called before anything changes
            _check_bf16_for_single_block_kernels(transformer)

    def before_quantizing(self, transformer: torch.nn.Module, steps: Speedups) -> None:
        if steps.gelu_sigmoid:
            use_sigmoid_gelu(transformer)

    def after_quantizing(self, transformer: torch.nn.Module, steps: Speedups) -> None:
        if steps.single_block_kernels:
            use_single_block_kernels(transformer)
        if steps.fused_qkv_mlp:
            fuse_single_block_projections(transformer)


HAND_WRITTEN = _HandWritten()
