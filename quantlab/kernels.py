"""A hand-written Triton kernel for chapter 06: the work between FLUX's QKV projection and fp8 attention.

Between a FLUX block's fused QKV projection and FlashAttention-3 on fp8 inputs, diffusers' attention
computes, for every head of every token: RMSNorm of q and of k (with their learned weights), the rotary
embedding (RoPE) of both, and a cast of q, k and v to float8 e4m3. torch.compile fuses these into a few
kernels. `qk_norm_rope_fp8` does all of it in one pass: it reads the projection's output once, in bf16,
and writes q, k and v once, in fp8. In the double-stream blocks it reads the text stream's projection too
and writes it first, as diffusers' `torch.cat([text, image])` does.

It rounds where diffusers does: RMSNorm's output and RoPE's output to the activations' dtype, then fp8. So
its outputs are what the unfused code gives, up to the order of float32 additions.

Triton compiles it for CUDA GPUs of compute capability 8.9+ (fp8); where Triton or such a GPU is missing,
`triton_problem()` says why.
`FlashAttention3Processor(fp8=True, rope_kernel=True)` in `quantlab.speed` calls it.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["BLOCK_TOKENS", "NUM_WARPS", "triton_problem", "qk_norm_rope_fp8", "qk_norm_rope_reference"]

BLOCK_TOKENS = 16  # tokens per program: one program handles these tokens of one head (timed on an H200)
NUM_WARPS = 4  # warps per program


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
    if not (_TRITON and qkv.is_cuda):  # a check torch.compile traces; triton_problem() below runs only eagerly
        problem = "Triton is not installed" if not _TRITON else f"the tensors are on {qkv.device.type}"
        raise RuntimeError(f"qk_norm_rope_fp8 is a Triton kernel for CUDA GPUs, and {problem}. Instead: "
                           "qk_norm_rope_reference, the same computation in PyTorch.")
    problem = None if torch.compiler.is_compiling() else triton_problem(qkv.device)  # eager: the GPU's generation
    if problem:
        raise RuntimeError(f"qk_norm_rope_fp8 cannot run here: {problem}. Instead: qk_norm_rope_reference, the same "
                           "computation in PyTorch.")
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
