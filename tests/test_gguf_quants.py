"""Tests for quantlab.gguf_quants: every type round-trips through gguf-py's own dequantizers."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantlab import gguf_quants as gq

F32 = np.float32

# Relative RMS error ||x - x_hat|| / ||x|| on N(0, 1) weights, 64 x 1024, seed 0. Measured over
# seeds 0-3 (in brackets) with about 10% headroom.
RELATIVE_RMS_BOUNDS = {
    "F16": 3e-4,  # [0.0002]
    "BF16": 2.2e-3,  # [0.0017]
    "Q8_0": 6.5e-3,  # [0.0053, 0.0054]
    "Q6_K": 0.020,  # [0.0176, 0.0177]
    "Q5_K": 0.040,  # [0.0360, 0.0362]
    "Q5_1": 0.042,  # [0.0377, 0.0379]
    "Q5_0": 0.047,  # [0.0427]
    "Q4_K": 0.079,  # [0.0710, 0.0715]
    "Q4_1": 0.086,  # [0.0781, 0.0784]
    "Q4_0": 0.094,  # [0.0856, 0.0859]
    "Q3_K": 0.166,  # [0.1504, 0.1510]
    "Q2_K": 0.327,  # [0.2956, 0.2971]
}


def normal_weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).numpy()


def relative_rms_error(original: np.ndarray, decoded: np.ndarray) -> float:
    return float(np.linalg.norm(original - decoded) / np.linalg.norm(original))


def round_trip(weights: np.ndarray, qtype: str) -> np.ndarray:
    return gq.dequantize(gq.quantize(weights, qtype), qtype).reshape(weights.shape)


@pytest.fixture(scope="module")
def normal_errors() -> dict[str, float]:
    weights = normal_weights()
    return {qtype: relative_rms_error(weights, round_trip(weights, qtype)) for qtype in gq.SUPPORTED_TYPES}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
def test_round_trip_error_is_bounded(qtype: str, normal_errors: dict[str, float]) -> None:
    assert normal_errors[qtype] < RELATIVE_RMS_BOUNDS[qtype]


def test_k_quant_errors_shrink_with_bits(normal_errors: dict[str, float]) -> None:
    errors = [normal_errors[qtype] for qtype in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")]
    assert errors == sorted(errors)
    for low, high in zip(("Q6_K", "Q5_K", "Q4_K", "Q3_K"), ("Q5_K", "Q4_K", "Q3_K", "Q2_K")):
        assert RELATIVE_RMS_BOUNDS[low] < RELATIVE_RMS_BOUNDS[high]


def test_k_quants_beat_legacy_types_at_equal_bits(normal_errors: dict[str, float]) -> None:
    # Q4_K and Q4_0 both spend 4.5 bits per weight, Q5_K and Q5_0 both 5.5.
    assert gq.bits_per_weight("Q4_K") == gq.bits_per_weight("Q4_0") == 4.5
    assert gq.bits_per_weight("Q5_K") == gq.bits_per_weight("Q5_0") == 5.5
    assert normal_errors["Q4_K"] < 0.9 * normal_errors["Q4_0"]
    assert normal_errors["Q5_K"] < 0.9 * normal_errors["Q5_0"]


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
def test_output_bytes_per_row(qtype: str) -> None:
    weights = normal_weights(rows=3, cols=512)
    packed = gq.quantize(weights, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert packed.shape[0] == 3
    assert packed.nbytes == 3 * 512 // block_size * type_size
    if qtype == "F16":
        assert packed.dtype == np.float16
    else:
        assert packed.dtype == np.uint8
        assert packed.shape[1] == 512 // block_size * type_size


def test_bits_per_weight() -> None:
    assert gq.bits_per_weight("F16") == 16.0
    assert gq.bits_per_weight("Q8_0") == 8.5
    assert gq.bits_per_weight("Q6_K") == 6.5625
    assert gq.bits_per_weight("Q2_K") == 2.625


def test_dequantize_returns_float32() -> None:
    weights = normal_weights(rows=2, cols=256)
    for qtype in ("F16", "Q4_K"):
        decoded = gq.dequantize(gq.quantize(weights, qtype), qtype)
        assert decoded.dtype == np.float32
        assert decoded.shape == (2, 256)


def test_inputs_torch_numpy_1d_and_chunking_agree() -> None:
    weights = normal_weights(rows=8, cols=512)
    reference = gq.quantize(weights, "Q4_K")
    assert np.array_equal(gq.quantize(torch.from_numpy(weights), "Q4_K"), reference)
    assert np.array_equal(gq.quantize(weights.astype(np.float64), "Q4_K"), reference)
    assert np.array_equal(gq.quantize(weights, "Q4_K", rows_per_chunk=3, device="cpu"), reference)
    assert np.array_equal(gq.quantize(weights[0], "Q4_K"), reference[:1])
    bf16_weights = torch.from_numpy(weights).to(torch.bfloat16)
    assert np.array_equal(gq.quantize(bf16_weights, "Q6_K"), gq.quantize(bf16_weights.float().numpy(), "Q6_K"))


# --------------------------------------------------------------------------- adversarial blocks


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
def test_all_zero_blocks_decode_to_exact_zeros(qtype: str) -> None:
    weights = normal_weights(rows=4, cols=768)
    weights[1] = 0.0
    weights[2, 256:512] = 0.0  # one zero super-block between non-zero ones
    decoded = round_trip(weights, qtype)
    assert np.all(decoded[1] == 0.0)
    assert np.all(decoded[2, 256:512] == 0.0)
    assert np.isfinite(decoded).all()


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
def test_constant_blocks(qtype: str) -> None:
    values = np.array([0.37, -2.5, 7.0, -123.0, 0.02, -0.05], dtype=F32)
    weights = np.repeat(values[:, None], 256, axis=1)
    decoded = round_trip(weights, qtype)
    worst_relative_error = np.abs(decoded - weights).max(axis=1) / np.abs(values)
    # Measured at most 2.3e-3 (BF16 of 0.37); fp16 block scales alone cost up to 5e-4.
    assert worst_relative_error.max() < 3e-3


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
def test_huge_outlier_is_kept(qtype: str) -> None:
    weights = normal_weights(rows=4, cols=256, seed=1)
    outliers = {(0, 17): 1e4, (1, 200): -1e4, (2, 0): 1e4, (3, 255): -3e3}
    for position, value in outliers.items():
        weights[position] = value
    decoded = round_trip(weights, qtype)
    assert np.isfinite(decoded).all()
    for position, value in outliers.items():
        # The outlier sets its block's scale, so it lands on a level: measured at most 3.7e-4 for
        # the quantized types. BF16 rounding alone can cost 2**-8 (3000 -> 3008 here).
        bound = 2**-8 if qtype == "BF16" else 1e-3
        assert abs(decoded[position] - value) / abs(value) <= bound
    assert relative_rms_error(weights, decoded) < 5e-3


@pytest.mark.parametrize("qtype", gq.SUPPORTED_TYPES)
@pytest.mark.parametrize("magnitude", [1e-40, 1e-9])
def test_subnormal_and_below_fp16_values_stay_finite(qtype: str, magnitude: float) -> None:
    # 1e-40 is a float32 subnormal; 1e-9 is below fp16's smallest subnormal (6e-8), so the fp16
    # block scales round to 0 and the blocks decode to (near) zero, never to NaN.
    weights = (normal_weights(rows=2, cols=512, seed=2) * magnitude).astype(F32)
    weights[1, :256] *= -1.0
    decoded = round_trip(weights, qtype)
    assert np.isfinite(decoded).all()
    assert np.abs(decoded).max() <= 10 * np.abs(weights).max()


def test_mixed_magnitudes_in_one_row() -> None:
    weights = normal_weights(rows=1, cols=1024, seed=3)
    weights[0, :256] *= 1e-40
    weights[0, 256:512] = 0.0
    weights[0, 512:768] *= 100.0
    for qtype in gq.KQUANT_TYPES:
        decoded = round_trip(weights, qtype)
        assert np.isfinite(decoded).all()
        assert np.all(decoded[0, 256:512] == 0.0)
        assert relative_rms_error(weights[:, 768:], decoded[:, 768:]) < RELATIVE_RMS_BOUNDS[qtype] * 1.5


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "F16"])
def test_non_finite_values_are_rejected(qtype: str) -> None:
    weights = normal_weights(rows=4, cols=256)
    weights[1, 3] = np.nan
    weights[2, 7] = np.inf
    weights[3, 9] = -np.inf
    with pytest.raises(ValueError, match=r"3 of 1024 values are NaN or inf.*nan_to_num"):
        gq.quantize(weights, qtype)
    with pytest.raises(ValueError, match="NaN or inf"):
        gq.quantize(torch.from_numpy(weights), qtype)


def test_columns_must_fill_whole_blocks() -> None:
    with pytest.raises(ValueError, match="256 weights per block.*300 columns"):
        gq.quantize(np.zeros((2, 300), F32), "Q4_K")
    with pytest.raises(ValueError, match="32 weights per block.*48 columns"):
        gq.quantize(np.zeros((2, 48), F32), "Q8_0")


def test_unknown_type_and_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="Unsupported GGUF type 'Q7_K'.*Q4_K"):
        gq.quantize(np.zeros((1, 256), F32), "Q7_K")
    with pytest.raises(ValueError, match=r"2-D \(rows, cols\).*reshape"):
        gq.quantize(np.zeros((2, 2, 256), F32), "Q4_K")


def test_values_too_large_for_fp16_scales_are_rejected() -> None:
    weights = normal_weights(rows=1, cols=256)
    weights[0, 0] = 1e9
    for qtype in ("Q4_K", "Q6_K", "Q8_0", "F16"):
        with pytest.raises(ValueError, match="overflowed fp16"):
            gq.quantize(weights, qtype)


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", gq.KQUANT_TYPES)
def test_cuda_matches_cpu_byte_for_byte(qtype: str) -> None:
    weights = normal_weights(rows=32, cols=1024, seed=4)
    weights[0] *= 1e-40  # groups whose scale overflows to inf: exercises the NaN handling
    weights[1] = 0.0
    weights[2, 5] = 1e4
    weights[3] = np.abs(weights[3])
    weights[4] = np.round(weights[4] * 2) / 2
    on_cpu = gq.quantize(weights, qtype, device="cpu")
    on_cuda = gq.quantize(torch.from_numpy(weights).cuda(), qtype)
    assert np.array_equal(on_cuda, on_cpu)


# --------------------------------------------------------------------------- ggml reference, one block at a time
#
# A plain scalar transcription of ggml's quantize_row_q4_K_ref and quantize_row_q6_K_ref, in
# float32 numpy scalars, loops as in the C code. The torch version must give the same bytes.


def ref_nearest_int(value: F32) -> int:
    shifted = np.array([value], dtype=F32) + F32(12582912.0)
    return int((shifted.view(np.int32)[0] & 0x7FFFFF) - 0x400000)


def ref_make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    n = len(x)
    lo = hi = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo = x[i] if x[i] < lo else lo
        hi = x[i] if x[i] > hi else hi
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if lo > 0:
        lo = F32(0)
    if hi == lo:
        return [0] * n, F32(0), -lo
    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    levels = [min(max(ref_nearest_int(iscale * (v - lo)), 0), nmax) for v in x]
    best_error = F32(0)
    for i in range(n):
        diff = scale * F32(levels[i]) + lo - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
        trial = [min(max(ref_nearest_int(iscale * (v - lo)), 0), nmax) for v in x]
        sum_l = sum_l2 = sum_xl = F32(0)
        for i in range(n):
            sum_l += weights[i] * F32(trial[i])
            sum_l2 += weights[i] * F32(trial[i]) * F32(trial[i])
            sum_xl += weights[i] * F32(trial[i]) * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = F32(0)
                this_scale = sum_xl / sum_l2
            error = F32(0)
            for i in range(n):
                diff = this_scale * F32(trial[i]) + this_min - x[i]
                error += weights[i] * (diff * diff)
            if error < best_error:
                levels, best_error, scale, lo = trial, error, this_scale, this_min
    return levels, scale, -lo


def ref_get_scale_min_k4(j: int, packed: bytearray) -> tuple[int, int]:
    if j < 4:
        return packed[j] & 63, packed[j + 4] & 63
    return (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)


def ref_quantize_q4_k_block(x: np.ndarray) -> bytes:
    x = [F32(v) for v in x]
    levels, scales, mins = [], [], []
    for j in range(8):
        group = x[32 * j : 32 * j + 32]
        sum_x2 = F32(0)
        for v in group:
            sum_x2 += v * v
        rms = np.sqrt(sum_x2 / F32(32))
        group_levels, scale, the_min = ref_make_qkx2_quants(group, [rms + abs(v) for v in group], 15, -1.0, 0.1, 20)
        levels += group_levels
        scales.append(scale)
        mins.append(the_min)
    max_scale = max_min = F32(0)
    for scale, the_min in zip(scales, mins):
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    packed = bytearray(12)
    for j in range(8):
        ls = min(63, ref_nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, ref_nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            packed[j], packed[j + 4] = ls, lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        sc, m = ref_get_scale_min_k4(j, packed)
        group_d = F32(d) * F32(sc)
        if group_d == 0:
            continue
        group_offset = F32(dmin) * F32(m)
        for i in range(32 * j, 32 * j + 32):
            levels[i] = min(max(ref_nearest_int((x[i] + group_offset) / group_d), 0), 15)
    qs = bytearray(128)
    for chunk in range(4):
        for i in range(32):
            qs[32 * chunk + i] = levels[64 * chunk + i] | (levels[64 * chunk + i + 32] << 4)
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def ref_make_qx_quants(x, nmax: int):
    """make_qx_quants with rmse_type=1 and no importance weights."""
    amax, signed_max = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, signed_max = abs(v), v
    if amax < F32(1e-15):
        return [0] * len(x), F32(0)

    def fit(iscale):
        levels = [max(-nmax, min(nmax - 1, ref_nearest_int(iscale * v))) for v in x]
        sum_lx = sum_l2 = F32(0)
        for v, level in zip(x, levels):
            w = v * v
            sum_lx += w * v * F32(level)
            sum_l2 += w * F32(level) * F32(level)
        return [level + nmax for level in levels], sum_lx, sum_l2

    levels, sum_lx, sum_l2 = fit(F32(-nmax) / signed_max)
    scale = sum_lx / sum_l2 if sum_l2 != 0 else F32(0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial, sum_lx, sum_l2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
        if sum_l2 > 0 and sum_lx * sum_lx > best * sum_l2:
            levels, scale = trial, sum_lx / sum_l2
            best = scale * sum_lx
    return levels, scale


def ref_quantize_q6_k_block(x: np.ndarray) -> bytes:
    x = [F32(v) for v in x]
    levels, scales = [], []
    for group in range(16):
        group_levels, scale = ref_make_qx_quants(x[16 * group : 16 * group + 16], 32)
        levels += group_levels
        scales.append(scale)
    max_abs_scale, max_scale = F32(0), F32(0)
    for scale in scales:
        if abs(scale) > max_abs_scale:
            max_abs_scale, max_scale = abs(scale), scale
    if max_abs_scale < F32(1e-15):
        return bytes(210)
    iscale = F32(-128) / max_scale
    d = np.float16(F32(1) / iscale)
    int_scales = [min(127, ref_nearest_int(iscale * scale)) for scale in scales]
    for group in range(16):
        group_d = F32(d) * F32(int_scales[group])
        if group_d == 0:
            continue
        for i in range(16 * group, 16 * group + 16):
            levels[i] = max(-32, min(31, ref_nearest_int(x[i] / group_d))) + 32
    ql, qh = bytearray(128), bytearray(64)
    for half in range(2):
        base = 128 * half
        for i in range(32):
            q1, q2, q3, q4 = (levels[base + i + 32 * k] for k in range(4))
            ql[64 * half + i] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            ql[64 * half + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            qh[32 * half + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(int_scales, dtype=np.int8).tobytes() + d.tobytes()


def reference_test_blocks() -> np.ndarray:
    """Two super-blocks that reach the reference's branches: N(0, 1), then small weights with an
    all-zero group, an all-positive group, an all-negative group and an outlier."""
    blocks = normal_weights(rows=2, cols=256, seed=5)
    blocks[1] *= 0.02
    blocks[1, 32:64] = 0.0
    blocks[1, 64:96] = np.abs(blocks[1, 64:96])
    blocks[1, 96:128] = -np.abs(blocks[1, 96:128])
    blocks[1, 200] = 3.0
    return blocks


@pytest.mark.parametrize(
    ("qtype", "reference_quantizer"),
    [("Q4_K", ref_quantize_q4_k_block), ("Q6_K", ref_quantize_q6_k_block)],
)
def test_matches_scalar_ggml_reference(qtype: str, reference_quantizer) -> None:
    blocks = reference_test_blocks()
    packed = gq.quantize(blocks, qtype)
    for row in range(blocks.shape[0]):
        assert packed[row].tobytes() == reference_quantizer(blocks[row])


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_the_torch_path_for_gpus_gives_gguf_pys_bytes(qtype):
    # quantize() takes this path for tensors on a GPU; run on the CPU it must match gguf-py exactly
    weights = normal_weights(rows=48, cols=512, seed=3)
    weights[0, :32] = 0.0  # an all-zero block
    weights[1, 5] = 1e4  # an outlier
    weights[2, :64] = 0.49999997 * 0.5  # a value that rounds differently through floor(x + 0.5)
    expected = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    packed = gq._quantize_legacy_in_torch(weights, qtype, torch.device("cpu"))
    assert packed.dtype == expected.dtype and packed.shape == expected.shape
    np.testing.assert_array_equal(packed, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_legacy_types_on_cuda_give_gguf_pys_bytes(qtype):
    weights = normal_weights(rows=48, cols=512, seed=4)
    expected = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(gq.quantize(torch.from_numpy(weights).cuda(), qtype), expected)


@pytest.mark.parametrize("qtype", gq.KQUANT_TYPES)
def test_k_quants_give_the_bytes_of_ggmls_reference_functions(qtype):
    # tests/data/ggml_kquant_reference.npz holds 17 rows of 512 values (normal, small, all positive,
    # all negative, zero, constant, +-1e4 outliers, subnormal, sparse, heavy-tailed) and the bytes that
    # ggml's quantize_row_q{2..6}_K_ref and their helpers, transcribed into C and built with
    # gcc -O2 -ffp-contract=off, wrote for them
    reference = np.load(Path(__file__).parent / "data" / "ggml_kquant_reference.npz")
    np.testing.assert_array_equal(gq.quantize(reference["inputs"], qtype), reference[qtype])
