"""Hand-written Triton kernels for chapter 06: the elementwise work around FLUX's fp8 matmuls.

torch.compile fuses the elementwise steps of a FLUX block into Triton kernels of its own. Three steps
run faster written by hand, each in one pass that reads its inputs once and writes its outputs once:

- `qk_norm_rope_fp8`: between a block's fused QKV projection and FlashAttention-3 on fp8 inputs, diffusers
  computes, for every head of every token, RMSNorm of q and of k (with their learned weights), the rotary
  embedding (RoPE) of both, and a cast of q, k and v to float8 e4m3. In the double-stream blocks it reads
  the text stream's projection too and writes it first, as diffusers' `torch.cat([text, image])` does.
- `layer_norm_modulate_fp8`: a single-stream block's start. It joins the text and image tokens, applies
  the LayerNorm and the modulation (`norm(x)·(1 + scale) + shift`), and quantizes the result to fp8 with
  the static scale of each Linear that reads it (the QKV projection and the MLP's first Linear).
- `gelu_cat_fp8`: a single-stream block's end. It joins the attention output and GELU(the MLP's first
  Linear's output), and quantizes both to fp8 with the static scale of the output projection.

Each rounds where diffusers, PyTorch and torchao do: to the activations' dtype after each step that
returns it, then to fp8 after dividing by the scale and clipping to ±448. So their outputs are what the
unfused code gives, up to the order of float32 additions; each `*_reference` function is that unfused code.

Triton compiles them for CUDA GPUs of compute capability 8.9+ (fp8); where Triton or such a GPU is missing,
`triton_problem()` says why. `FlashAttention3Processor(fp8=True, rope_kernel=True)` in `quantlab.lab.hand_written`
calls the first; `hand_written.use_single_block_kernels` installs the other two.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["BLOCK_TOKENS", "NUM_WARPS", "NORM_ROWS", "NORM_WARPS", "GELU_COLUMNS", "GELU_WARPS", "FP8_MAX",
           "triton_problem", "qk_norm_rope_fp8", "qk_norm_rope_reference", "layer_norm_modulate_fp8",
           "layer_norm_modulate_reference", "gelu_cat_fp8", "gelu_cat_reference"]

BLOCK_TOKENS = 16  # tokens per program: one program handles these tokens of one head (timed on an H200)
NUM_WARPS = 4  # warps per program
FP8_MAX = 448.0  # float8 e4m3's largest value: torchao clips to ±FP8_MAX before the cast
NORM_ROWS, NORM_WARPS = 1, 2  # layer_norm_modulate_fp8's launch: tokens per program, warps (timed on an H200)
GELU_COLUMNS, GELU_WARPS = 1024, 2  # gelu_cat_fp8's: columns of one token per program, warps (likewise)


_TRITON = importlib.util.find_spec("triton") is not None


def triton_problem(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run here ('Triton is not installed', 'no CUDA GPU', the GPU's generation), or None."""
    if not _TRITON:
        return "Triton is not installed (it comes with PyTorch's CUDA builds)"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU here"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"this GPU is of compute capability {major}.{minor}, and the kernel writes fp8, which Triton "
                "compiles for 8.9+ (Ada, Hopper)")
    return None


if _TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_rope_store(source, weight_ptr, out_ptr, target, mask, dims, cos, sin, eps,
                         HEAD_DIM: tl.constexpr, TOKENS: tl.constexpr):
        x = tl.load(source, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        weight = tl.load(weight_ptr + dims).to(tl.float32)
        # torch.nn.RMSNorm: float32 inside, the activations' dtype out
        x = (x * rstd[:, None] * weight[None, :]).to(source.dtype.element_ty).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (TOKENS, HEAD_DIM // 2, 2)))
        # diffusers' apply_rotary_emb: x·cos + (-odd, even)·sin, pair by pair, rounded to the activations' dtype
        rotated = tl.reshape(tl.join(-odd, even), (TOKENS, HEAD_DIM))
        x = (x * cos + rotated * sin).to(source.dtype.element_ty)
        tl.store(out_ptr + target, x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_fp8_kernel(qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                                 tokens, offset, qkv_stride_batch, qkv_stride_token, rope_stride_token,
                                 out_stride_batch, out_stride_token, eps,
                                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, TOKENS: tl.constexpr):
        token = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        head = tl.program_id(1)
        batch = tl.program_id(2)
        mask = (token < tokens)[:, None]
        dims = tl.arange(0, HEAD_DIM)
        column = head * HEAD_DIM + dims[None, :]
        source = qkv_ptr + batch * qkv_stride_batch + token[:, None] * qkv_stride_token + column
        target = batch * out_stride_batch + (offset + token)[:, None] * out_stride_token + column
        rope = (offset + token)[:, None] * rope_stride_token + dims[None, :]
        cos = tl.load(cos_ptr + rope, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rope, mask=mask, other=0.0).to(tl.float32)
        _norm_rope_store(source, q_weight_ptr, q_ptr, target, mask, dims, cos, sin, eps, HEAD_DIM, TOKENS)
        _norm_rope_store(source + HEADS * HEAD_DIM, k_weight_ptr, k_ptr, target, mask, dims, cos, sin, eps,
                         HEAD_DIM, TOKENS)
        value = tl.load(source + 2 * HEADS * HEAD_DIM, mask=mask, other=0.0)
        tl.store(v_ptr + target, value.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rounded_to_bf16(x):
        # x (float32) rounded to bfloat16, nearest with ties to even, back in float32, in integer arithmetic: a
        # plain round trip (x.to(bf16).to(fp32)) between a multiply and an add of bf16 values lets the compiler
        # fuse the two into one FMA, which rounds once where PyTorch rounds twice.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _to_fp8(x, scale_ptr, out_ptr, target, mask):
        # torchao's static quantization: float32 / scale, clipped to e4m3's range, then the cast
        y = tl.minimum(tl.maximum(x / tl.load(scale_ptr), -448.0), 448.0)
        tl.store(out_ptr + target, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _layer_norm_modulate_fp8_kernel(text_ptr, image_ptr, shift_ptr, scale_ptr, joined_ptr, first_scale_ptr,
                                        first_ptr, second_scale_ptr, second_ptr, text_tokens, tokens,
                                        text_stride_batch, image_stride_batch, shift_stride_batch,
                                        scale_stride_batch, EPS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                                        ROWS: tl.constexpr, SECOND: tl.constexpr):
        token = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        batch = tl.program_id(1)
        dims = tl.arange(0, BLOCK)
        mask = (token < tokens)[:, None] & (dims < DIM)[None, :]
        text_row = text_ptr + batch * text_stride_batch + tl.minimum(token, text_tokens - 1) * DIM
        image_row = image_ptr + batch * image_stride_batch + tl.maximum(token - text_tokens, 0) * DIM
        source = tl.where((token < text_tokens)[:, None], text_row[:, None], image_row[:, None]) + dims[None, :]
        x = tl.load(source, mask=mask, other=0.0)
        target = (batch * tokens + token)[:, None] * DIM + dims[None, :]
        tl.store(joined_ptr + target, x, mask=mask)
        x = x.to(tl.float32)
        centred = tl.where(mask, x - (tl.sum(x, axis=1) / DIM)[:, None], 0.0)
        # eps a constant: torch.compile would pass a float argument in float64
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / DIM + EPS)
        y = _rounded_to_bf16(centred * rstd[:, None])  # nn.LayerNorm: float32 inside, the activations' dtype out
        columns = (dims < DIM)[None, :]
        # diffusers' norm(x)·(1 + scale) + shift: three operations on bf16 tensors, each rounded
        scale = tl.load(scale_ptr + batch * scale_stride_batch + dims[None, :], mask=columns, other=0.0)
        y = _rounded_to_bf16(y * _rounded_to_bf16(1.0 + scale.to(tl.float32)))
        shift = tl.load(shift_ptr + batch * shift_stride_batch + dims[None, :], mask=columns, other=0.0)
        y = _rounded_to_bf16(y + shift.to(tl.float32))
        _to_fp8(y, first_scale_ptr, first_ptr, target, mask)
        if SECOND:
            _to_fp8(y, second_scale_ptr, second_ptr, target, mask)

    @triton.jit
    def _gelu_cat_fp8_kernel(attention_ptr, mlp_ptr, scale_ptr, out_ptr, attention_stride_row, mlp_stride_row,
                             ATTENTION_DIM: tl.constexpr, MLP_DIM: tl.constexpr, BLOCK: tl.constexpr):
        column = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = tl.program_id(1)
        mask = column < ATTENTION_DIM + MLP_DIM
        dtype = mlp_ptr.dtype.element_ty
        if tl.program_id(0) * BLOCK < ATTENTION_DIM:  # a tile of the attention output: copied
            y = tl.load(attention_ptr + row * attention_stride_row + column, mask=mask).to(tl.float32)
        else:  # a tile of the MLP: GELU's tanh form as x·σ(2z) (speed.gelu_tanh_via_sigmoid), rounded
            x = tl.load(mlp_ptr + row * mlp_stride_row + column - ATTENTION_DIM, mask=mask).to(tl.float32)
            z2 = x * (1.5957691216057308 + 0.0713548162726009 * x * x)  # 2z = 2·√(2/π)·(x + 0.044715·x³)
            y = (x / (1.0 + tl.exp2(-1.4426950408889634 * z2))).to(dtype).to(tl.float32)
        _to_fp8(y, scale_ptr, out_ptr, row * (ATTENTION_DIM + MLP_DIM) + column, mask)


def _check_runs_here(kernel: str, tensor: torch.Tensor) -> None:
    """Refuse to launch `kernel` where it cannot run, naming its `*_reference` twin to use instead."""
    if not (_TRITON and tensor.is_cuda):  # a check torch.compile traces; triton_problem() below runs only eagerly
        problem = "Triton is not installed" if not _TRITON else f"the tensors are on {tensor.device.type}"
        raise RuntimeError(f"{kernel} is a Triton kernel for CUDA GPUs, and {problem}. Instead: "
                           f"{kernel.replace('_fp8', '')}_reference, the same computation in PyTorch.")
    problem = None if torch.compiler.is_compiling() else triton_problem(tensor.device)  # eager: the GPU's generation
    if problem:
        raise RuntimeError(f"{kernel} cannot run here: {problem}. Instead: {kernel.replace('_fp8', '')}_reference, "
                           "the same computation in PyTorch.")


def _eps(norm: torch.nn.Module, dtype: torch.dtype) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps  # torch.nn.RMSNorm's default


def qk_norm_rope_fp8(qkv: torch.Tensor, q_norm: torch.nn.Module, k_norm: torch.nn.Module,
                     rotary: tuple[torch.Tensor, torch.Tensor], heads: int, text_qkv: torch.Tensor | None = None,
                     text_q_norm: torch.nn.Module | None = None, text_k_norm: torch.nn.Module | None = None,
                     out_dtype: torch.dtype = torch.float8_e4m3fn, block_tokens: int = BLOCK_TOKENS,
                     num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v for FlashAttention-3 from a fused QKV projection's output, in one Triton kernel per stream.

    `qkv` is (batch, tokens, 3·heads·head_dim): q, then k, then v, as `to_qkv` returns them. `q_norm`
    and `k_norm` are the block's `torch.nn.RMSNorm`s, `rotary` is the (cos, sin) pair that FLUX's
    transformer passes its blocks, over the text tokens and then the image tokens. A double-stream block
    passes its text stream too (`text_qkv`, `text_q_norm`, `text_k_norm`). Returns q, k and v as
    (batch, text + image tokens, heads, head_dim) tensors of `out_dtype`. `block_tokens` and `num_warps`
    set the launch: how many tokens of one head a program handles, with how many warps.
    """
    cos, sin = rotary
    batch, image_tokens, width = qkv.shape
    head_dim = width // 3 // heads
    if width != 3 * heads * head_dim or head_dim & (head_dim - 1):
        raise ValueError(f"qkv's last dimension ({width}) must be 3 × {heads} heads × a head_dim that is a power of "
                         "two (FLUX's is 128). Instead: qk_norm_rope_reference.")
    text_tokens = 0 if text_qkv is None else text_qkv.shape[1]
    if cos.shape != (text_tokens + image_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"rotary holds cos and sin of shape {tuple(cos.shape)}; the tokens and head_dim want "
                         f"({text_tokens + image_tokens}, {head_dim}).")
    eps = _eps(q_norm, qkv.dtype)
    for norm in (k_norm, text_q_norm, text_k_norm):
        if norm is not None and _eps(norm, qkv.dtype) != eps:
            raise ValueError(f"The kernel takes one RMSNorm eps, and q's norm has {eps}, another {norm.eps}. "
                             "Instead: qk_norm_rope_reference.")
    _check_runs_here("qk_norm_rope_fp8", qkv)
    cos, sin = cos.contiguous(), sin.contiguous()
    q, k, v = (torch.empty(batch, text_tokens + image_tokens, heads, head_dim, dtype=out_dtype, device=qkv.device)
               for _ in range(3))
    streams = [(qkv, q_norm, k_norm, text_tokens)]
    if text_qkv is not None:
        streams.insert(0, (text_qkv, text_q_norm, text_k_norm, 0))
    for source, norm_q, norm_k, offset in streams:
        source = source if source.stride(-1) == 1 else source.contiguous()
        grid = (triton.cdiv(source.shape[1], block_tokens), heads, batch)
        _qk_norm_rope_fp8_kernel[grid](
            source, norm_q.weight, norm_k.weight, cos, sin, q, k, v, source.shape[1], offset,
            source.stride(0), source.stride(1), cos.stride(0), q.stride(0), q.stride(1), eps,
            HEADS=heads, HEAD_DIM=head_dim, TOKENS=block_tokens, num_warps=num_warps)
    return q, k, v


def qk_norm_rope_reference(qkv: torch.Tensor, q_norm: torch.nn.Module, k_norm: torch.nn.Module,
                           rotary: tuple[torch.Tensor, torch.Tensor], heads: int,
                           text_qkv: torch.Tensor | None = None, text_q_norm: torch.nn.Module | None = None,
                           text_k_norm: torch.nn.Module | None = None,
                           out_dtype: torch.dtype = torch.float8_e4m3fn):
    """What `qk_norm_rope_fp8` computes, with diffusers' and PyTorch's own calls (the unfused path)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def split(x, norm_q, norm_k):
        q, k, v = (part.unflatten(-1, (heads, -1)) for part in x.chunk(3, dim=-1))
        return norm_q(q), norm_k(k), v

    q, k, v = split(qkv, q_norm, k_norm)
    if text_qkv is not None:
        q, k, v = (torch.cat([text, image], dim=1) for text, image in zip(split(text_qkv, text_q_norm, text_k_norm),
                                                                          (q, k, v)))
    q, k = (apply_rotary_emb(x, rotary, sequence_dim=1) for x in (q, k))
    return tuple(x.to(out_dtype) for x in (q, k, v))


def _quantize_fp8(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """torchao's static activation quantization (`_quantize_affine_float8`): float32 / scale, clipped, cast."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(out_dtype)


def _check_input_scales(kernel: str, input_scales) -> None:
    if not 1 <= len(input_scales) <= 2 or any(s.numel() != 1 for s in input_scales):
        raise ValueError(f"{kernel} takes one or two static input scales, one number each (torchao's "
                         "per-tensor act_quant_scale), and got "
                         f"{[tuple(s.shape) for s in input_scales]}.")


def layer_norm_modulate_fp8(text: torch.Tensor, image: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                            input_scales: tuple[torch.Tensor, ...], eps: float = 1e-6,
                            out_dtype: torch.dtype = torch.float8_e4m3fn, rows_per_program: int | None = None,
                            num_warps: int | None = None) -> tuple[torch.Tensor, ...]:
    """A single-stream block's start in one Triton kernel: tokens joined, LayerNorm, modulation, fp8.

    `text` and `image` are (batch, tokens, dim) bfloat16 activations, `shift` and `scale` the block's (batch, dim)
    modulation (`AdaLayerNormZeroSingle`'s first two chunks), `input_scales` the static scales of the one
    or two Linears that read the result. Returns the joined tokens (text first, the block's residual) and
    `LayerNorm(joined)·(1 + scale) + shift` quantized with each input scale, as `out_dtype` tensors.
    `rows_per_program` and `num_warps` set the launch: how many tokens a program handles, with how many warps
    (NORM_ROWS and NORM_WARPS where None).
    """
    _check_input_scales("layer_norm_modulate_fp8", input_scales)
    batch, text_tokens, dim = text.shape
    if image.shape[::2] != (batch, dim) or shift.shape != (batch, dim) or scale.shape != shift.shape:
        raise ValueError(f"text {tuple(text.shape)}, image {tuple(image.shape)}, shift {tuple(shift.shape)} and "
                         f"scale {tuple(scale.shape)} must share the batch and the last dimension.")
    if not text.dtype == image.dtype == shift.dtype == scale.dtype == torch.bfloat16:
        raise ValueError("layer_norm_modulate_fp8 rounds where PyTorch does on bfloat16 activations, and these are "
                         f"{image.dtype}. Instead: layer_norm_modulate_reference.")
    _check_runs_here("layer_norm_modulate_fp8", image)
    text, image = (x if x.stride(-1) == 1 and x.stride(-2) == dim else x.contiguous() for x in (text, image))
    shift, scale = (x if x.stride(-1) == 1 else x.contiguous() for x in (shift, scale))
    rows_per_program, num_warps = rows_per_program or NORM_ROWS, num_warps or NORM_WARPS
    tokens = text_tokens + image.shape[1]
    joined = torch.empty(batch, tokens, dim, dtype=image.dtype, device=image.device)
    outputs = [torch.empty(batch, tokens, dim, dtype=out_dtype, device=image.device) for _ in input_scales]
    first_scale, second_scale = input_scales[0], input_scales[-1]
    _layer_norm_modulate_fp8_kernel[(triton.cdiv(tokens, rows_per_program), batch)](
        text, image, shift, scale, joined, first_scale, outputs[0], second_scale, outputs[-1], text_tokens,
        tokens, text.stride(0), image.stride(0), shift.stride(0), scale.stride(0), EPS=eps, DIM=dim,
        BLOCK=triton.next_power_of_2(dim), ROWS=rows_per_program, SECOND=len(input_scales) == 2, num_warps=num_warps)
    return joined, *outputs


def layer_norm_modulate_reference(text: torch.Tensor, image: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, input_scales: tuple[torch.Tensor, ...], eps: float = 1e-6,
                                  out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, ...]:
    """What `layer_norm_modulate_fp8` computes, with diffusers', PyTorch's and torchao's own steps."""
    _check_input_scales("layer_norm_modulate_reference", input_scales)
    joined = torch.cat([text, image], dim=1)
    modulated = (torch.nn.functional.layer_norm(joined, joined.shape[-1:], eps=eps) * (1 + scale[:, None])
                 + shift[:, None])
    return joined, *(_quantize_fp8(modulated, s, out_dtype) for s in input_scales)


def gelu_cat_fp8(attention: torch.Tensor, mlp: torch.Tensor, input_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.float8_e4m3fn, block_columns: int | None = None,
                 num_warps: int | None = None) -> torch.Tensor:
    """A single-stream block's end in one Triton kernel: `cat([attention, GELU(mlp)])` quantized to fp8.

    `attention` is the attention's (batch, tokens, dim) output, `mlp` the MLP's first Linear's (batch,
    tokens, mlp_dim) output, `input_scale` the static scale of the output projection that reads the
    result. GELU is the tanh form, computed as x·σ(2z) (the same function, as the `gelu-sigmoid` step
    computes it) and rounded to `mlp`'s dtype. Returns a (batch, tokens, dim + mlp_dim) `out_dtype` tensor.
    A program handles `block_columns` columns of one token (fewer where they would straddle the attention
    output and the MLP), with `num_warps` warps (GELU_COLUMNS and GELU_WARPS where None).
    """
    _check_input_scales("gelu_cat_fp8", (input_scale,))
    if attention.shape[:-1] != mlp.shape[:-1]:
        raise ValueError(f"attention {tuple(attention.shape)} and mlp {tuple(mlp.shape)} must have the same tokens.")
    _check_runs_here("gelu_cat_fp8", mlp)
    leading, attention_dim, mlp_dim = mlp.shape[:-1], attention.shape[-1], mlp.shape[-1]
    attention, mlp = (x.reshape(-1, x.shape[-1]) for x in (attention, mlp))  # rows: a view where it can be
    attention, mlp = (x if x.stride(-1) == 1 else x.contiguous() for x in (attention, mlp))
    block, num_warps = block_columns or GELU_COLUMNS, num_warps or GELU_WARPS
    while attention_dim % block:  # no tile holds both attention output and MLP
        block //= 2
    out = torch.empty(*mlp.shape[:-1], attention_dim + mlp_dim, dtype=out_dtype, device=mlp.device)
    grid = (triton.cdiv(attention_dim + mlp_dim, block), mlp.shape[0])
    _gelu_cat_fp8_kernel[grid](attention, mlp, input_scale, out, attention.stride(0), mlp.stride(0),
                               ATTENTION_DIM=attention_dim, MLP_DIM=mlp_dim, BLOCK=block, num_warps=num_warps)
    return out.view(*leading, attention_dim + mlp_dim)


def gelu_cat_reference(attention: torch.Tensor, mlp: torch.Tensor, input_scale: torch.Tensor,
                       out_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """What `gelu_cat_fp8` computes, with PyTorch's tanh GELU and torchao's quantization."""
    _check_input_scales("gelu_cat_reference", (input_scale,))
    mlp = torch.nn.functional.gelu(mlp, approximate="tanh")
    return _quantize_fp8(torch.cat([attention.to(mlp.dtype), mlp], dim=-1), input_scale, out_dtype)
