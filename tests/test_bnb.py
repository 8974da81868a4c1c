"""bitsandbytes on a CPU through quantlab.bnb, and (on a GPU) proof that it matches diffusers' own path."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

import quantlab as ql

CONFIGS = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16),
}


def bf16_transformer(path):
    return FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def reference(tiny_path):
    return bf16_transformer(tiny_path)


@pytest.fixture(scope="module")
def inputs(tiny_pipe):
    call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 2}
    return ql.quality.capture_transformer_inputs(tiny_pipe, "a red circle", call)


@pytest.fixture(scope="module")
def quantized(tiny_path):
    return {name: ql.bnb.quantize_modules(bf16_transformer(tiny_path), config) for name, config in CONFIGS.items()}


def linear_bytes(model, names):
    return sum(ql.measure.weights_bytes(model.get_submodule(n)) for n in names)


def test_every_linear_becomes_a_bitsandbytes_layer(reference, quantized):
    names = set(ql.models.linear_layers(reference))
    assert set(ql.bnb.quantized_linears(quantized["8bit"])) == names
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in ql.bnb.quantized_linears(quantized["nf4"]).values())
    to_q = quantized["8bit"].transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.int8 and to_q.weight.SCB.shape == (256,)
    # what stays unquantized keeps the load dtype
    assert quantized["8bit"].transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16


def test_8bit_stores_one_byte_per_weight_plus_a_scale_per_row(reference, quantized):
    names = list(ql.bnb.quantized_linears(quantized["8bit"]))
    weights = sum(reference.get_submodule(n).weight.numel() for n in names)
    rows = sum(reference.get_submodule(n).out_features for n in names)
    biases = sum(reference.get_submodule(n).bias.numel() for n in names if reference.get_submodule(n).bias is not None)
    assert linear_bytes(quantized["8bit"], names) == weights + 4 * rows + 2 * biases
    assert linear_bytes(quantized["8bit"], names) <= 0.55 * linear_bytes(reference, names)


def test_4bit_packs_two_weights_per_byte_and_stays_under_three_tenths(reference, quantized):
    names = list(ql.bnb.quantized_linears(quantized["nf4"]))
    to_q = quantized["nf4"].transformer_blocks[0].attn.to_q.weight
    assert to_q.dtype == torch.uint8 and to_q.numel() == 256 * 256 // 2
    assert to_q.quant_state.absmax.numel() == 256 * 256 // 64
    for name in ("nf4", "fp4"):
        assert linear_bytes(quantized[name], names) <= 0.3 * linear_bytes(reference, names)


def test_double_quantization_saves_about_a_third_of_a_bit_per_weight(reference, quantized):
    names = list(ql.bnb.quantized_linears(quantized["nf4"]))
    params = sum(reference.get_submodule(n).weight.numel() for n in names)
    saved_bits = 8 * (linear_bytes(quantized["nf4"], names) - linear_bytes(quantized["nf4-double"], names)) / params
    # 0.373 bits at full scale; each small layer's own 1 KiB code table takes a visible share here
    assert 0.25 < saved_bits < 0.373


def test_nf4_error_is_at_most_fp4_error(reference, quantized, inputs):
    with torch.no_grad():
        target = reference(**inputs)[0]
        sqnr = {name: ql.quality.sqnr_db(quantized[name](**inputs)[0], target) for name in ("8bit", "fp4", "nf4")}
    assert sqnr["nf4"] >= sqnr["fp4"]
    assert sqnr["8bit"] > sqnr["nf4"] + 6  # 8-bit is far closer to bf16
    assert sqnr["8bit"] > 25


def test_skip_modules_match_child_names(tiny_path):
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["proj_out"])
    model = ql.bnb.quantize_modules(bf16_transformer(tiny_path), config)
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {"proj_out"} | {f"single_transformer_blocks.{i}.proj_out" for i in range(4)}


def test_dequantize_restores_dtype_and_bytes(tiny_path, reference):
    model = ql.bnb.quantize_modules(bf16_transformer(tiny_path), CONFIGS["nf4"])
    restored = ql.bnb.dequantize_modules(model)
    assert ql.bnb.quantized_linears(restored) == {}
    assert restored.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    assert ql.measure.weights_bytes(restored) == ql.measure.weights_bytes(reference)
    error = ql.quality.relative_error(restored.transformer_blocks[0].ff.net[2].weight,
                                      reference.transformer_blocks[0].ff.net[2].weight)
    assert 0.02 < error < 0.15  # the 4-bit rounding stays; only the storage goes back to bf16
    with pytest.raises(ValueError, match="nothing to dequantize"):
        ql.bnb.dequantize_modules(reference)


def test_quantize_modules_needs_a_quantizing_config(reference):
    with pytest.raises(ValueError, match="load_in_8bit=True or load_in_4bit=True"):
        ql.bnb.quantize_modules(reference, BitsAndBytesConfig())


def test_cpu_load_paths_say_which_path_ran(tiny_path):
    loaded = ql.bnb.load_transformer(tiny_path, CONFIGS["8bit"], torch.bfloat16, "cpu")
    assert loaded.path == ql.bnb.CPU_MODULES_PATH


def test_code_values():
    nf4, fp4 = ql.bnb.code_values("nf4"), ql.bnb.code_values("fp4")
    assert nf4.numel() == fp4.numel() == 16
    assert nf4[0] == -1 and nf4[-1] == 1 and (nf4 == 0).any()
    assert torch.all(nf4[1:] > nf4[:-1])
    with pytest.raises(ValueError, match="nf4, fp4"):
        ql.bnb.code_values("int4")


def test_outlier_column_fraction_counts_columns():
    x = torch.zeros(2, 5, 8)
    x[0, 3, 2] = 7.0   # column 2 exceeds 6
    x[1, 0, 5] = -12.0  # column 5 exceeds 6 and 10
    assert ql.bnb.outlier_column_fraction(x, 6.0) == 2 / 8
    assert ql.bnb.outlier_column_fraction(x, 10.0) == 1 / 8
    assert ql.bnb.outlier_column_fraction(x, float("inf")) == 0.0


def test_layer_errors_rank_4bit_above_8bit(reference, inputs):
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"]
    captured = ql.quality.capture_linear_inputs(reference, lambda: reference(**inputs), names)
    assert set(captured) == set(names)
    eight = {r["layer"]: r["relative_error"] for r in ql.bnb.layer_errors(reference, captured, CONFIGS["8bit"])}
    four = {r["layer"]: r["relative_error"] for r in ql.bnb.layer_errors(reference, captured, CONFIGS["nf4"])}
    assert all(0 < eight[n] < four[n] < 0.2 for n in names)


def _codes(weight, four_bit: bool) -> torch.Tensor:
    codes = weight.data.cpu().to(torch.int16)
    return torch.stack([codes >> 4, codes & 15]) if four_bit else codes  # 4-bit: two codes per byte


def _block_scales(weight) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    state = weight.quant_state
    if not state.nested:
        return state.absmax.cpu().float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).cpu().float()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with diffusers' CUDA-only bitsandbytes path")
@pytest.mark.parametrize("name", ["8bit", "nf4", "nf4-double"])
def test_cpu_path_matches_diffusers_path_on_cuda(tiny_path, name):
    """The same weights quantized by diffusers on CUDA and by quantize_modules on the CPU.

    The codes are those of one algorithm: identical but for the rare value that lies on a
    rounding boundary, where CPU and GPU float arithmetic may land on neighbouring codes.
    """
    config = CONFIGS[name]
    on_cuda = FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", quantization_config=config,
                                                     dtype=torch.bfloat16, device_map="cuda")
    on_cpu = ql.bnb.quantize_modules(bf16_transformer(tiny_path), config, "cpu")
    cuda_layers, cpu_layers = ql.bnb.quantized_linears(on_cuda), ql.bnb.quantized_linears(on_cpu)
    assert set(cuda_layers) == set(cpu_layers)
    four_bit = name != "8bit"
    total = differing = 0
    for layer in cuda_layers:
        a, b = cuda_layers[layer].weight, cpu_layers[layer].weight
        codes_a, codes_b = _codes(a, four_bit), _codes(b, four_bit)
        assert codes_a.shape == codes_b.shape
        assert (codes_a - codes_b).abs().max() <= 1, f"{layer}: codes differ by more than one step"
        total += codes_a.numel()
        differing += int((codes_a != codes_b).sum())
        if four_bit:
            torch.testing.assert_close(_block_scales(a), _block_scales(b), rtol=0.02 if config.bnb_4bit_use_double_quant
                                       else 1e-6, atol=0)
        else:
            torch.testing.assert_close(a.SCB.cpu(), b.SCB, rtol=1e-6, atol=0)
    assert differing / total <= 1e-4, f"{differing} of {total} codes differ"


def test_quantized_layers_run_in_the_models_mode_so_the_threshold_acts(tiny_path, reference, inputs):
    # In training mode bitsandbytes' 8-bit layer would skip int8 activations, and the threshold with them.
    with torch.no_grad():
        target = reference(**inputs)[0]
        sqnr = {}
        for threshold in (0.0, 1.0):
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
            model = ql.bnb.quantize_modules(bf16_transformer(tiny_path), config)
            assert not any(layer.training for layer in ql.bnb.quantized_linears(model).values())
            sqnr[threshold] = ql.quality.sqnr_db(model(**inputs)[0], target)
    assert sqnr[1.0] > sqnr[0.0] + 1  # routing most columns through 16-bit lowers the error


def test_4bit_storage_and_dequantize_survive_a_cpu_forward(tiny_path, reference, inputs):
    model = ql.bnb.quantize_modules(bf16_transformer(tiny_path), CONFIGS["nf4-double"])
    stored = ql.measure.weights_bytes(model)
    with torch.no_grad():
        target = reference(**inputs)[0]
        quantized_sqnr = ql.quality.sqnr_db(model(**inputs)[0], target)
    assert ql.measure.weights_bytes(model) == stored  # nested scales stay 8-bit after running
    restored = ql.bnb.dequantize_modules(model)
    with torch.no_grad():
        assert ql.quality.sqnr_db(restored(**inputs)[0], target) == pytest.approx(quantized_sqnr, abs=0.05)
