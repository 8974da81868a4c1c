"""Quantize float tensors into GGUF block formats, with the byte layout that gguf-py reads back.

The legacy formats (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) and F16/BF16 are quantized by the gguf package
itself when the tensor is on the CPU. For a tensor on a GPU, F16, BF16, Q8_0, Q4_0 and Q4_1 run the
same arithmetic in torch there (tested to give gguf-py's bytes), because gguf-py's single CPU
thread would take minutes for the 12B transformer. gguf-py can only *read* the K-quants, so this
module writes them: ggml's reference quantizers (`quantize_row_q{2..6}_K_ref` in ggml-quants.c)
transcribed into float32 torch, every super-block of a chunk at once, on the CPU or a GPU.

The transcription keeps ggml's order of float operations, so it gives the same bytes as those
reference functions built in C without fused multiply-add (tests/data holds such bytes), and
the same bytes on CPU and CUDA:

- sums run one term at a time in the loop order of the C code (`_sum_in_order`), not with
  `torch.sum`, whose reduction order differs between devices;
- every division is tensor by tensor: PyTorch's CUDA kernels turn division by a Python number
  into multiplication by its reciprocal, which can differ in the last bit;
- `nearest_int` is ggml's 1.5 * 2**23 bit trick, including what it gives out of range.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

__all__ = [
    "GGUF_PY_TYPES",
    "KQUANT_TYPES",
    "SUPPORTED_TYPES",
    "bits_per_weight",
    "dequantize",
    "quantize",
]

KQUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_PY_TYPES = ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")  # quantized by the gguf package itself
SUPPORTED_TYPES = GGUF_PY_TYPES + KQUANT_TYPES

QK_K = 256  # weights per K-quant super-block
GROUP_MAX_EPS = 1e-15  # ggml treats a group whose largest |x| is below this as all zeros
# Weights per chunk when rows_per_chunk is not given. A GPU wants big chunks, since each chunk
# costs a few thousand kernel launches. On the CPU, 2**21 weights ran about 10% faster than 2**23
# (3072 x 3072, Q4_K) and keep the ~10 float32 temporaries of a chunk under 100 MiB.
DEFAULT_WEIGHTS_PER_CHUNK = {"cpu": 1 << 21, "cuda": 1 << 24}

# Where the fp16 scale fields sit in a legacy block (count of leading fp16 values), checked for
# overflow after gguf quantizes.
_LEGACY_FP16_FIELDS = {"Q8_0": 1, "Q4_0": 1, "Q5_0": 1, "Q4_1": 2, "Q5_1": 2}


def bits_per_weight(qtype: str) -> float:
    """Storage cost of `qtype` in bits per weight, scales included. Chapters 02, 07."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[_quant_type(qtype)]
    return type_size * 8 / block_size


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Decode GGUF bytes (or gguf's F16/BF16 array) of `qtype` with gguf-py, as float32. Chapter 02."""
    decoded = gguf.quants.dequantize(np.asarray(data), _quant_type(qtype))
    return decoded.astype(np.float32, copy=False)


def quantize(
    weights: torch.Tensor | np.ndarray,
    qtype: str,
    *,
    device: str | torch.device | None = None,
    rows_per_chunk: int | None = None,
) -> np.ndarray:
    """Quantize a 2-D (rows, cols) float tensor to `qtype`; returns uint8 array of shape (rows, bytes_per_row) (for F16/BF16 return gguf's native array).

    A 1-D tensor counts as one row. K-quants run in torch on `device` (default: where `weights`
    already is), `rows_per_chunk` rows at a time (default: about 2 M weights per chunk on
    the CPU, 16 M on a GPU). Chapters 02, 07.
    """
    quant_type = _quant_type(qtype)
    rows = _as_rows(weights)
    block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
    n_rows, n_cols = rows.shape
    if n_cols % block_size != 0:
        raise ValueError(
            f"{qtype} packs {block_size} weights per block, but the rows have {n_cols} columns; "
            f"pad the rows to a multiple of {block_size} or pick another type."
        )
    _check_finite(rows)

    target_device = torch.device(device) if device is not None else _device_of(rows)
    if qtype in _TORCH_LEGACY_QUANTIZERS and target_device.type != "cpu":
        # gguf-py runs in one CPU thread (about 60 M weights/s), which would make the 12B
        # transformer take minutes per type; the same arithmetic in torch runs on the GPU
        packed = _quantize_legacy_in_torch(rows, qtype, target_device)
        _check_legacy_scales(packed, qtype, type_size)
        return packed
    if qtype in GGUF_PY_TYPES:
        rows_np = _to_numpy_float32(rows)
        # gguf-py divides by block scales that underflow for tiny (e.g. subnormal) blocks and warns;
        # those blocks still decode to zeros, and real overflow is checked below.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            packed = gguf.quants.quantize(rows_np, quant_type)
        _check_legacy_scales(packed, qtype, type_size)
        return packed

    if rows_per_chunk is None:
        weights_per_chunk = DEFAULT_WEIGHTS_PER_CHUNK.get(target_device.type, 1 << 24)
        rows_per_chunk = max(1, weights_per_chunk // max(n_cols, 1))
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}.")

    quantize_blocks = _KQUANT_BLOCK_QUANTIZERS[qtype]
    bytes_per_row = n_cols // QK_K * type_size
    packed = np.empty((n_rows, bytes_per_row), dtype=np.uint8)
    if packed.size == 0:
        return packed
    for start in range(0, n_rows, rows_per_chunk):
        chunk = _to_torch_float32(rows[start : start + rows_per_chunk], target_device)
        superblocks = chunk.reshape(-1, QK_K)
        packed_chunk = quantize_blocks(superblocks)
        packed[start : start + chunk.shape[0]] = packed_chunk.reshape(chunk.shape[0], bytes_per_row).cpu().numpy()
    return packed


# --------------------------------------------------------------------------- input handling


def _quant_type(qtype: str) -> gguf.GGMLQuantizationType:
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"Unsupported GGUF type {qtype!r}; supported: {', '.join(SUPPORTED_TYPES)}.")
    return gguf.GGMLQuantizationType[qtype]


def _as_rows(weights: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    if not isinstance(weights, (torch.Tensor, np.ndarray)):
        raise TypeError(f"weights must be a torch.Tensor or numpy.ndarray, got {type(weights).__name__}.")
    if weights.ndim == 1:
        return weights.reshape(1, -1)
    if weights.ndim != 2:
        raise ValueError(
            f"quantize takes a 2-D (rows, cols) tensor, got shape {tuple(weights.shape)}; "
            "GGUF blocks run along the last axis, so reshape first, e.g. weights.reshape(-1, weights.shape[-1])."
        )
    return weights


def _check_finite(rows: torch.Tensor | np.ndarray) -> None:
    if isinstance(rows, torch.Tensor):
        n_bad = int((~torch.isfinite(rows)).sum())
    else:
        n_bad = int((~np.isfinite(rows)).sum())
    if n_bad:
        raise ValueError(
            f"{n_bad} of {rows.shape[0] * rows.shape[1]} values are NaN or inf, which GGUF blocks cannot encode; "
            "replace them (e.g. torch.nan_to_num) or find where the weights went non-finite."
        )


def _to_numpy_float32(rows: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        return rows.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(rows, dtype=np.float32)


def _to_torch_float32(rows: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(rows, np.ndarray):
        rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return rows.detach().to(device=device, dtype=torch.float32).contiguous()


def _device_of(rows: torch.Tensor | np.ndarray) -> torch.device:
    return rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")


def _check_legacy_scales(packed: np.ndarray, qtype: str, type_size: int) -> None:
    """Raise if gguf stored an fp16 scale that overflowed (or F16 values that did)."""
    if qtype == "BF16":
        return
    if qtype == "F16":
        overflowed = bool(np.isinf(packed).any())
    else:
        blocks = packed.reshape(-1, type_size)
        n_fields = _LEGACY_FP16_FIELDS[qtype]
        scales = np.ascontiguousarray(blocks[:, : 2 * n_fields]).view(np.float16)
        overflowed = bool(np.isinf(scales).any())
    if overflowed:
        raise ValueError(_TOO_LARGE_MESSAGE.format(qtype=qtype))


_TOO_LARGE_MESSAGE = (
    "Some values are too large for {qtype}: a block scale overflowed fp16 (max 65504). "
    "Rescale the tensor or keep it in BF16/F32."
)


def _check_fp16_scales(qtype: str, *scales_fp16: torch.Tensor) -> None:
    if any(bool(torch.isinf(scale).any()) for scale in scales_fp16):
        raise ValueError(_TOO_LARGE_MESSAGE.format(qtype=qtype))


# --------------------------------------------------------------------------- ggml's helpers


def _nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the 1.5 * 2**23 trick, as int32.

    Out-of-range values give what the C trick gives (inf gives -2**22), so the bytes match the
    reference even for groups whose scale overflows to inf (values near 1e-38 and below).
    """
    if values.device.type != "cpu":
        # NaN (from inf * 0 in such groups) made by a CPU, x86 or Arm, has mantissa 0x400000,
        # which the trick maps to 0; CUDA's NaN (0x7FFFFFFF) would give 2**22 - 1. Pin NaN to 0
        # so every device gives the CPU's bytes. (Skipped on the CPU, where it costs a pass.)
        values = torch.nan_to_num(values, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    shifted = values + 12582912.0
    return shifted.view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)


def _nearest_level(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """nearest_int clamped to [low, high], as float32 so that it joins float arithmetic directly."""
    return _nearest_int(values).clamp_(low, high).to(torch.float32)


def _sum_in_order(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one term at a time, like ggml's `float s = 0; for (...) s += t;`."""
    total = terms[0] + 0.0  # 0 + t, as in C, so that a -0.0 first term gives +0.0
    for term in terms[1:]:
        total.add_(term)
    return total


def _full(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of `value` on `like`'s device, for exact tensor-by-tensor division."""
    return torch.full_like(like, float(np.float32(value)), dtype=torch.float32)


def _first_abs_max(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed value, |value|) of the first entry with the largest magnitude, as ggml's `if (ax > amax)` loop picks it."""
    magnitudes = values.abs()
    index = magnitudes.argmax(dim=dim, keepdim=True)  # argmax returns the first maximum
    return values.gather(dim, index).squeeze(dim), magnitudes.gather(dim, index).squeeze(dim)


def _positive_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """max(0, max(values)) with +0.0 when nothing is positive, as `float m = 0; if (v > m) m = v;` gives."""
    largest = values.amax(dim=dim)
    return torch.where(largest > 0, largest, torch.zeros_like(largest))


def _fp16_bytes(values_fp16: torch.Tensor) -> torch.Tensor:
    """(n,) float16 -> (n, 2) little-endian uint8."""
    return values_fp16.contiguous().view(torch.uint8).reshape(-1, 2)


def _concat_bytes(*fields: torch.Tensor) -> torch.Tensor:
    """Lay a block's fields side by side as (n_blocks, type_size) uint8, in struct order."""
    return torch.cat([field.to(torch.uint8) for field in fields], dim=1)


def _pack_bit_planes(levels: torch.Tensor, bits_per_level: int) -> torch.Tensor:
    """OR levels[..., k, :] << (bits_per_level * k) over dim -2: the shift packing of ggml's K-quants."""
    packed = torch.zeros_like(levels[..., 0, :])
    for plane in range(levels.shape[-2]):
        packed |= levels[..., plane, :] << (bits_per_level * plane)
    return packed


def _make_qkx2_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on groups laid out as (group_size, n_groups).

    Fits x ~ scale * L - the_min with L in [0, nmax], trying nstep + 1 candidate scales and keeping
    the weighted least-squares fit with the lowest weighted error. Returns (L, scale, the_min).
    """
    # In-place steps on fresh temporaries: on the CPU, allocating a large tensor costs about as
    # much as the arithmetic on it.
    def weighted_error(scale: torch.Tensor, levels: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        diff = (scale * levels).add_(offset).sub_(x)
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _sum_in_order(diff.mul_(weights))

    def levels_for(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return _nearest_level((x - offset).mul_(iscale), 0, nmax)

    group_min = x.amin(dim=0)
    group_max = x.amax(dim=0)
    sum_w = weights[0].clone()
    sum_x = sum_w * x[0]
    for w_i, x_i in zip(weights[1:], x[1:]):
        sum_w.add_(w_i)
        sum_x.add_(w_i * x_i)
    group_min = torch.where(group_min > 0, torch.zeros_like(group_min), group_min)
    flat = group_max == group_min
    flat_min = group_min

    def span() -> torch.Tensor:
        # ggml divides by (max - min) with the best offset so far, which moves as fits improve.
        # Flat groups return early in C; give them a harmless span and overwrite their result.
        return torch.where(flat, torch.ones_like(group_max), group_max - group_min)

    iscale = _full(nmax, group_max) / span()
    scale = _full(1.0, iscale) / iscale
    levels = levels_for(iscale, group_min)
    best_error = weighted_error(scale, levels, group_min)

    for step in range(nstep + 1):
        numerator = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = _full(numerator, group_max) / span()
        trial_levels = levels_for(iscale, group_min)
        w_l = weights * trial_levels
        sum_l = _sum_in_order(w_l)
        sum_xl = _sum_in_order(w_l * x)
        sum_l2 = _sum_in_order(w_l.mul_(trial_levels))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # A positive offset would need negative levels; ggml pins it to 0 and refits the scale alone.
        min_positive = this_min > 0
        this_scale = torch.where(min_positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(min_positive, torch.zeros_like(this_min), this_min)
        cur_error = weighted_error(this_scale, trial_levels, this_min)
        better = (det > 0) & (cur_error < best_error)
        levels = torch.where(better, trial_levels, levels, out=levels)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        group_min = torch.where(better, this_min, group_min)

    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    group_min = torch.where(flat, flat_min, group_min)
    return levels, scale, -group_min


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type=1 and no importance weights, groups as (group_size, n_groups).

    Symmetric levels L - nmax in [-nmax, nmax - 1], weights x**2; tries 19 candidate scales around
    nmax / max|x|. Returns (L with the +nmax offset, scale).
    """
    signed_max, abs_max = _first_abs_max(x, dim=0)
    all_zero = abs_max < GROUP_MAX_EPS
    signed_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)
    weights = x * x
    w_x = weights * x

    def fit(numerator: np.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = _full(numerator, signed_max) / signed_max
        levels = _nearest_level(iscale * x, -nmax, nmax - 1)
        return levels, _sum_in_order(w_x * levels), _sum_in_order(weights * levels * levels)

    levels, sum_lx, sum_l2 = fit(np.float32(-nmax))
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial_levels, sum_lx, sum_l2 = fit(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        levels = torch.where(better, trial_levels, levels)
        scale = torch.where(better, sum_lx / sum_l2, scale)
        best = torch.where(better, scale * sum_lx, best)

    levels = torch.where(all_zero, torch.zeros_like(levels), levels + nmax)
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    return levels, scale


def _make_q3_quants_rmse(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse, groups as (group_size, n_groups).

    Starts from levels round(-nmax * x / max) in [-nmax, nmax - 1], then up to 5 passes of
    coordinate descent on the x**2-weighted fit, element by element in order (each accepted
    change updates the sums the next element sees). Returns (L with the +nmax offset, scale).
    """
    signed_max, abs_max = _first_abs_max(x, dim=0)
    all_zero = abs_max < GROUP_MAX_EPS
    signed_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)
    iscale = _full(-nmax, signed_max) / signed_max
    levels = _nearest_level(iscale * x, -nmax, nmax - 1)
    weights = x * x
    w_x = weights * x
    sum_lx = _sum_in_order(w_x * levels)
    sum_l2 = _sum_in_order(weights * levels * levels)

    for _ in range(5):
        any_changed = torch.zeros_like(all_zero)
        for i in range(x.shape[0]):
            x_i, w_i, wx_i, l_i = x[i], weights[i], w_x[i], levels[i]
            slx = sum_lx - wx_i * l_i
            sl2 = sum_l2 - w_i * l_i * l_i
            new_l = _nearest_level(x_i * sl2 / slx, -nmax, nmax - 1)
            new_slx = slx + wx_i * new_l
            new_sl2 = sl2 + w_i * new_l * new_l
            accept = (
                (slx > 0)
                & (new_l != l_i)
                & (new_sl2 > 0)
                & (new_slx * new_slx * sum_l2 > sum_lx * sum_lx * new_sl2)
            )
            levels[i] = torch.where(accept, new_l, l_i)
            sum_lx = torch.where(accept, new_slx, sum_lx)
            sum_l2 = torch.where(accept, new_sl2, sum_l2)
            any_changed |= accept
        # A pass that changes nothing leaves the state as it was, so the next would change nothing
        # either: stopping when no group changed equals ggml's per-group early exit.
        if not bool(any_changed.any()):
            break

    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    levels = torch.where(all_zero, torch.zeros_like(levels), levels + nmax)
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    return levels, scale


def _groups_first(superblocks: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_superblocks, 256) -> (group_size, n_groups): element i of every group is one contiguous row."""
    return superblocks.reshape(-1, group_size).T.contiguous()


def _superblocks_back(levels: torch.Tensor) -> torch.Tensor:
    """(group_size, n_groups) float levels -> (n_superblocks, 256) int32, ggml's element order."""
    return levels.T.reshape(-1, QK_K).to(torch.int32)


def _requantize(
    x: torch.Tensor,
    levels: torch.Tensor,
    d_group: torch.Tensor,
    offset_group: torch.Tensor | None,
    low: int,
    high: int,
    level_offset: int = 0,
) -> torch.Tensor:
    """Redo the levels against the stored (rounded) scales: round((x + offset) / d), clamped, + level_offset.

    Groups whose stored scale is 0 keep their levels from the search, as ggml's `if (!d) continue;` does.
    """
    shifted = x if offset_group is None else x + offset_group
    requantized = _nearest_level(shifted / d_group, low, high) + level_offset
    return torch.where(d_group != 0, requantized, levels)


# --------------------------------------------------------------------------- the K-quants


def _quantize_q2_k(superblocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_ref: 16 groups of 16, 2-bit levels, 4-bit scales and mins, fp16 d and dmin."""
    n_blocks = superblocks.shape[0]
    x = _groups_first(superblocks, 16)
    levels, scales, mins = _make_qkx2_quants(x, x.abs(), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
    scales = scales.reshape(n_blocks, 16)
    mins = mins.reshape(n_blocks, 16)

    max_scale = _positive_max(scales, dim=1)
    max_min = _positive_max(mins, dim=1)
    has_scale = (max_scale > 0)[:, None]
    has_min = (max_min > 0)[:, None]
    safe_max_scale = torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))
    safe_max_min = torch.where(max_min > 0, max_min, torch.ones_like(max_min))
    scale_levels = _nearest_int((_full(15.0, safe_max_scale) / safe_max_scale)[:, None] * scales) & 0xFF
    scale_levels = torch.where(has_scale, scale_levels, torch.zeros_like(scale_levels))
    min_levels = _nearest_int((_full(15.0, safe_max_min) / safe_max_min)[:, None] * mins)
    # C stores `scales[j] = l` into a uint8, then ORs `l << 4` into it: the min's bits land on top.
    packed_scales = torch.where(has_min, (scale_levels | (min_levels << 4)) & 0xFF, scale_levels)
    d = torch.where(max_scale > 0, max_scale / _full(15.0, max_scale), torch.zeros_like(max_scale)).half()
    dmin = torch.where(max_min > 0, max_min / _full(15.0, max_min), torch.zeros_like(max_min)).half()
    _check_fp16_scales("Q2_K", d, dmin)

    d_group = (d.float()[:, None] * (packed_scales & 0xF).float()).reshape(-1)
    offset_group = (dmin.float()[:, None] * (packed_scales >> 4).float()).reshape(-1)
    levels = _requantize(x, levels, d_group, offset_group, 0, 3)

    # qs: byte l of each 128-weight half holds weights l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7.
    qs = _pack_bit_planes(_superblocks_back(levels).reshape(n_blocks, 2, 4, 32), 2).reshape(n_blocks, 64)
    return _concat_bytes(packed_scales, qs, _fp16_bytes(d), _fp16_bytes(dmin))


def _quantize_q3_k(superblocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref: 16 groups of 16, 3-bit signed levels (2 low bits + hmask bit), 6-bit signed scales, fp16 d."""
    n_blocks = superblocks.shape[0]
    x = _groups_first(superblocks, 16)
    levels, scales = _make_q3_quants_rmse(x, nmax=4)
    scales = scales.reshape(n_blocks, 16)

    max_scale, _ = _first_abs_max(scales, dim=1)
    has_scale = max_scale != 0
    safe_max_scale = torch.where(has_scale, max_scale, torch.ones_like(max_scale))
    iscale = _full(-32.0, safe_max_scale) / safe_max_scale
    scale_levels = _nearest_int(iscale[:, None] * scales)
    scale_levels = ((scale_levels & 0xFF) ^ 0x80) - 0x80  # C keeps it in an int8_t
    scale_levels = scale_levels.clamp(-32, 31) + 32
    scale_levels = torch.where(has_scale[:, None], scale_levels, torch.zeros_like(scale_levels))
    d = torch.where(has_scale, _full(1.0, iscale) / iscale, torch.zeros_like(iscale)).half()
    _check_fp16_scales("Q3_K", d)

    d_group = (d.float()[:, None] * (scale_levels - 32).float()).reshape(-1)
    levels = _requantize(x, levels, d_group, None, -4, 3, level_offset=4)

    # Scales, 6 bits each: low nibbles of scales j and j+8 share byte j (0-7); the top 2 bits of
    # scales m, m+4, m+8, m+12 fill byte 8+m.
    scale_bytes_low = (scale_levels[:, :8] & 0xF) | ((scale_levels[:, 8:] & 0xF) << 4)
    scale_bytes_high = _pack_bit_planes((scale_levels >> 4).reshape(n_blocks, 4, 4), 2)
    level_rows = _superblocks_back(levels)
    # hmask bit k of byte m says weight 32k+m has level >= 4; the 2 low bits pack like Q2_K.
    hmask = _pack_bit_planes((level_rows > 3).to(torch.int32).reshape(n_blocks, 8, 32), 1)
    qs = _pack_bit_planes((level_rows & 3).reshape(n_blocks, 2, 4, 32), 2).reshape(n_blocks, 64)
    return _concat_bytes(hmask, qs, scale_bytes_low, scale_bytes_high, _fp16_bytes(d))


def _k4_scales_and_levels(
    superblocks: torch.Tensor, qtype: str, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part Q4_K and Q5_K share: 8 groups of 32 with 6-bit scales and mins, fp16 d and dmin.

    Returns (level_rows (n_blocks, 256), packed 12 scale bytes, d, dmin).
    """
    n_blocks = superblocks.shape[0]
    x = _groups_first(superblocks, 32)
    rms = torch.sqrt(_sum_in_order(x * x) / _full(32.0, x[0]))
    weights = rms + x.abs()
    levels, scales, mins = _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scales.reshape(n_blocks, 8)
    mins = mins.reshape(n_blocks, 8)

    max_scale = _positive_max(scales, dim=1)
    max_min = _positive_max(mins, dim=1)
    safe_max_scale = torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))
    safe_max_min = torch.where(max_min > 0, max_min, torch.ones_like(max_min))
    inv_scale = torch.where(max_scale > 0, _full(63.0, max_scale) / safe_max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _full(63.0, max_min) / safe_max_min, torch.zeros_like(max_min))
    # C: `uint8_t ls = nearest_int(...); ls = MIN(63, ls);` wraps to a byte, then caps.
    scale_levels = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)
    min_levels = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    d = (max_scale / _full(63.0, max_scale)).half()
    dmin = (max_min / _full(63.0, max_min)).half()
    _check_fp16_scales(qtype, d, dmin)

    d_group = (d.float()[:, None] * scale_levels.float()).reshape(-1)
    offset_group = (dmin.float()[:, None] * min_levels.float()).reshape(-1)
    levels = _requantize(x, levels, d_group, offset_group, 0, nmax)

    # get_scale_min_k4 layout: bytes 0-3 scales 0-3, bytes 4-7 mins 0-3, each with the top 2 bits
    # of scale/min j+4 in bits 6-7; bytes 8-11 the low nibbles of scale and min j+4.
    packed_scales = torch.cat(
        [
            scale_levels[:, :4] | ((scale_levels[:, 4:] >> 4) << 6),
            min_levels[:, :4] | ((min_levels[:, 4:] >> 4) << 6),
            (scale_levels[:, 4:] & 0xF) | ((min_levels[:, 4:] & 0xF) << 4),
        ],
        dim=1,
    )
    return _superblocks_back(levels), packed_scales, d, dmin


def _quantize_q4_k(superblocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_K_ref: 8 groups of 32, 4-bit levels, 6-bit scales and mins, fp16 d and dmin."""
    n_blocks = superblocks.shape[0]
    level_rows, packed_scales, d, dmin = _k4_scales_and_levels(superblocks, "Q4_K", 15, -1.0, 0.1, 20)
    # Each 64-weight chunk: byte l holds weight l in the low nibble and weight l+32 in the high one.
    qs = _pack_bit_planes(level_rows.reshape(n_blocks, 4, 2, 32), 4).reshape(n_blocks, 128)
    return _concat_bytes(_fp16_bytes(d), _fp16_bytes(dmin), packed_scales, qs)


def _quantize_q5_k(superblocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q5_K_ref: as Q4_K with 5-bit levels; the fifth bits go to qh."""
    n_blocks = superblocks.shape[0]
    level_rows, packed_scales, d, dmin = _k4_scales_and_levels(superblocks, "Q5_K", 31, -0.5, 0.1, 15)
    # qh bit k of byte m is the fifth bit of weight 32k+m.
    qh = _pack_bit_planes((level_rows >> 4).reshape(n_blocks, 8, 32), 1)
    qs = _pack_bit_planes((level_rows & 0xF).reshape(n_blocks, 4, 2, 32), 4).reshape(n_blocks, 128)
    return _concat_bytes(_fp16_bytes(d), _fp16_bytes(dmin), packed_scales, qh, qs)


def _quantize_q6_k(superblocks: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_ref: 16 groups of 16, 6-bit signed levels, int8 scales, fp16 d."""
    n_blocks = superblocks.shape[0]
    x = _groups_first(superblocks, 16)
    levels, scales = _make_qx_quants_rmse1(x, nmax=32)
    scales = scales.reshape(n_blocks, 16)

    # This scale prologue has the shape of Q3_K's and other arithmetic (Q6_K tests |max| < GROUP_MAX_EPS and scales
    # by -128, Q3_K tests max != 0 and scales by -32): each is transcribed from its own ggml reference function, and
    # they are kept apart on purpose, so that each can be read line by line against its source.
    max_scale, max_abs_scale = _first_abs_max(scales, dim=1)
    all_zero = max_abs_scale < GROUP_MAX_EPS
    safe_max_scale = torch.where(all_zero, torch.ones_like(max_scale), max_scale)
    iscale = _full(-128.0, safe_max_scale) / safe_max_scale
    d = torch.where(all_zero, torch.zeros_like(iscale), _full(1.0, iscale) / iscale).half()
    _check_fp16_scales("Q6_K", d)
    scale_levels = _nearest_int(iscale[:, None] * scales).clamp(max=127)
    scale_levels = ((scale_levels & 0xFF) ^ 0x80) - 0x80  # stored as int8_t
    scale_levels = torch.where(all_zero[:, None], torch.zeros_like(scale_levels), scale_levels)

    d_group = (d.float()[:, None] * scale_levels.float()).reshape(-1)
    levels = _requantize(x, levels, d_group, None, -32, 31, level_offset=32)
    levels = torch.where(all_zero.repeat_interleave(16)[None, :], torch.zeros_like(levels), levels)

    # Per 128-weight half, as quarters q0..q3 of 32: ql bytes 0-31 hold q0 | q2 << 4, bytes 32-63
    # q1 | q3 << 4 (low nibbles); qh byte l holds the top 2 bits of q0..q3 at bits 0, 2, 4, 6.
    quarters = _superblocks_back(levels).reshape(n_blocks, 2, 4, 32)
    low = quarters & 0xF
    ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(n_blocks, 128)
    qh = _pack_bit_planes(quarters >> 4, 2).reshape(n_blocks, 64)
    scale_bytes = scale_levels & 0xFF
    return _concat_bytes(ql, qh, scale_bytes, _fp16_bytes(d))


# --------------------------------------------------------------------------- legacy types in torch


def _quantize_legacy_in_torch(rows, qtype: str, device: torch.device) -> np.ndarray:
    """F16, BF16, Q8_0, Q4_0 and Q4_1 as gguf-py quantizes them, but in torch on `device`."""
    values = _to_torch_float32(rows, device)
    if qtype == "F16":
        return values.to(torch.float16).cpu().numpy()
    if qtype == "BF16":
        return values.to(torch.bfloat16).view(torch.uint8).cpu().numpy()  # gguf-py gives bf16 as bytes
    block_size, _ = gguf.GGML_QUANT_SIZES[_quant_type(qtype)]
    blocks = values.reshape(-1, block_size)
    packed = _TORCH_LEGACY_QUANTIZERS[qtype](blocks)
    return packed.reshape(values.shape[0], -1).cpu().numpy()


def _inverse_or_zero(scale: torch.Tensor) -> torch.Tensor:
    # 1 / d, tensor by tensor (see the module docstring), and 0 where the block is all zeros
    return torch.where(scale == 0, torch.zeros_like(scale), _full(1.0, scale) / scale)


def _pack_nibble_halves(levels: torch.Tensor) -> torch.Tensor:
    """ggml's 4-bit packing: weight j in the low nibble, weight j + block/2 in the high one."""
    low, high = levels.chunk(2, dim=-1)
    return low | (high << 4)


def _quantize_q8_0_torch(blocks: torch.Tensor) -> torch.Tensor:
    scale = blocks.abs().amax(dim=-1, keepdim=True) / _full(127.0, blocks[:, :1])
    scaled = blocks * _inverse_or_zero(scale)
    magnitude = scaled.abs()
    whole = torch.floor(magnitude)
    # roundf (half away from zero) written as gguf-py writes it: floor(|x| + 0.5) would round
    # 0.49999997 up, since the sum is not representable in float32
    levels = torch.sign(scaled) * (whole + torch.floor(2 * (magnitude - whole)))
    return _concat_bytes(_fp16_bytes(scale.to(torch.float16)), levels.to(torch.int8).view(torch.uint8))


def _quantize_q4_0_torch(blocks: torch.Tensor) -> torch.Tensor:
    signed_max, _ = _first_abs_max(blocks, dim=-1)
    scale = signed_max.reshape(-1, 1) / _full(-8.0, blocks[:, :1])
    levels = torch.trunc(blocks * _inverse_or_zero(scale) + 8.5).clamp(0, 15).to(torch.uint8)
    return _concat_bytes(_fp16_bytes(scale.to(torch.float16)), _pack_nibble_halves(levels))


def _quantize_q4_1_torch(blocks: torch.Tensor) -> torch.Tensor:
    low = blocks.amin(dim=-1, keepdim=True)
    scale = (blocks.amax(dim=-1, keepdim=True) - low) / _full(15.0, blocks[:, :1])
    levels = torch.trunc((blocks - low) * _inverse_or_zero(scale) + 0.5).clamp(0, 15).to(torch.uint8)
    return _concat_bytes(_fp16_bytes(scale.to(torch.float16)), _fp16_bytes(low.to(torch.float16)),
                         _pack_nibble_halves(levels))


_TORCH_LEGACY_QUANTIZERS = {
    "F16": None,
    "BF16": None,
    "Q8_0": _quantize_q8_0_torch,
    "Q4_0": _quantize_q4_0_torch,
    "Q4_1": _quantize_q4_1_torch,
}


_KQUANT_BLOCK_QUANTIZERS = {
    "Q2_K": _quantize_q2_k,
    "Q3_K": _quantize_q3_k,
    "Q4_K": _quantize_q4_k,
    "Q5_K": _quantize_q5_k,
    "Q6_K": _quantize_q6_k,
}
