"""Tests for quantlab.quality: image and tensor error, non-finite values, compiled against eager, captured inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import quantlab as ql
from quantlab import quality
from quantlab.quality import (
    COMPILE_AGREEMENT_DB,
    CompileCheck,
    NonFiniteError,
    check_finite,
    compare_compiled,
    finite_outputs,
    psnr_db,
    relative_error,
    sqnr_db,
    ssim,
)


def _image(seed: int = 0, shape=(64, 64, 3)) -> np.ndarray:
    """A random uint8 image with values kept away from 0 and 255, so offsets and noise do not clip."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 236, size=shape, dtype=np.uint8)


def _smooth_image(size: int = 64) -> np.ndarray:
    """A smooth RGB image with structure at several scales (gradients and a blob)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r = 60 + 120 * x / (size - 1)
    g = 60 + 120 * y / (size - 1)
    b = 60 + 120 * np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 6) ** 2))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


# --- psnr_db ------------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    image = _image()
    assert psnr_db(image, image.copy()) == float("inf")


def test_psnr_constant_offset_matches_formula():
    image = _image()
    shifted = image + np.uint8(10)  # values 20..235 -> 30..245: no wrap-around
    assert int(shifted.min()) == int(image.min()) + 10
    expected = 10 * math.log10(255**2 / 100)  # MSE of a constant offset of 10 is 100
    assert psnr_db(shifted, image) == pytest.approx(expected, abs=1e-9)
    assert psnr_db(image, shifted) == pytest.approx(expected, abs=1e-9)


def test_psnr_respects_max_value():
    a = np.zeros((4, 4))
    b = np.full((4, 4), 0.1)  # MSE 0.01 on a 0..1 scale -> 20 dB
    assert psnr_db(a, b, max_value=1.0) == pytest.approx(20.0, abs=1e-9)


def test_psnr_grayscale_and_pil_inputs():
    from PIL import Image

    gray = _image(shape=(16, 16))
    rgb = _image(1)
    assert psnr_db(Image.fromarray(rgb), rgb) == float("inf")
    assert psnr_db(gray, gray.astype(np.float32) + 5) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)


def test_psnr_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_db(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


# --- ssim ---------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    image = _smooth_image()
    assert ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-9)
    noisy = _image(3)
    assert ssim(noisy, noisy.copy()) == pytest.approx(1.0, abs=1e-9)


def test_ssim_of_inverse_is_low():
    image = _image(4)
    inverse = 255 - image
    value = ssim(inverse, image)
    assert value < 0.1
    assert value < 0  # anti-correlated structure gives a negative index


def test_ssim_drops_monotonically_with_noise():
    image = _smooth_image().astype(np.float64)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(image.shape)
    values = [ssim(np.clip(image + sigma * noise, 0, 255), image) for sigma in (2, 5, 15, 30)]
    assert values == sorted(values, reverse=True)
    assert values[0] < 1.0
    assert values[1] > values[3] + 0.1  # sigma 5 clearly above sigma 30
    assert values[3] > 0


def test_ssim_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 1)))


# --- sqnr_db / relative_error -------------------------------------------------------------------


def test_sqnr_and_relative_error_known_values():
    reference = torch.tensor([3.0, 4.0])  # norm 5
    noisy = reference + torch.tensor([0.3, 0.4])  # error norm 0.5: 10% relative, 20 dB
    assert relative_error(noisy, reference) == pytest.approx(0.1)
    assert sqnr_db(noisy, reference) == pytest.approx(20.0)
    assert sqnr_db(reference, reference) == float("inf")


# --- non-finite values --------------------------------------------------------------------------

# What every NonFiniteError of a figure says to try: the weights, and a wider dtype than float16.
WHAT_TO_TRY = r"so it cannot be measured\. Check the weights.*use bf16.*or float32"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tensor_figures_refuse_nan_and_inf_and_say_what_to_try(bad):
    reference = torch.tensor([3.0, 4.0, 5.0])
    broken = reference.clone()
    broken[1] = bad
    for figure in (sqnr_db, relative_error):
        with pytest.raises(NonFiniteError, match=r"^The output holds NaN or infinite values, " + WHAT_TO_TRY):
            figure(broken, reference)
        with pytest.raises(NonFiniteError, match=r"^The reference output holds NaN or infinite values, " + WHAT_TO_TRY):
            figure(reference, broken)
    assert issubclass(NonFiniteError, ValueError)  # code that caught ValueError still catches it
    with pytest.raises(NonFiniteError):  # 16-bit tensors too (they are widened to float64 first)
        sqnr_db(broken.bfloat16(), reference.bfloat16())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_image_figures_refuse_nan_and_inf_and_say_what_to_try(bad):
    image = _smooth_image().astype(np.float64)
    broken = image.copy()
    broken[5, 7, 1] = bad
    for figure in (psnr_db, ssim):
        with pytest.raises(NonFiniteError, match=r"^The image holds NaN or infinite values, " + WHAT_TO_TRY):
            figure(broken, image)
        with pytest.raises(NonFiniteError, match=r"^The reference image holds NaN or infinite values, " + WHAT_TO_TRY):
            figure(image, broken)


def test_check_finite_returns_what_it_checked_or_gives_the_advice_it_is_given():
    values = torch.ones(3)
    assert check_finite(values, "latents") is values
    array = np.zeros(2)
    assert check_finite(array, "image") is array
    with pytest.raises(NonFiniteError, match=r"^The latents holds NaN or infinite values, so it cannot be measured\. "
                                             r"Decode in float32\.$"):
        check_finite(torch.tensor([0.0, float("nan")]), "latents", "Decode in float32.")


@pytest.fixture
def nan_transformer_pipe(tiny_pipe):
    """A copy of the tiny pipeline whose transformer has a NaN in one weight (the output projection's)."""
    pipe = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("nan")
    assert not torch.isnan(tiny_pipe.transformer.proj_out.weight).any()  # the session's pipeline is untouched
    return pipe


def _no_hooks_left(pipe) -> bool:
    return not any(module._forward_hooks for module in (pipe.transformer, pipe.text_encoder_2, pipe.vae.decoder))


def test_timing_a_pipeline_whose_transformer_gives_nan_names_the_transformer(nan_transformer_pipe):
    pipe = nan_transformer_pipe
    call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 2}
    with pytest.raises(NonFiniteError, match=r"^The transformer \(in torch\.bfloat16\) produced NaN or infinite "
                                             r"values\. FLUX's transformer overflows float16.*use bf16"):
        ql.measure.time_generation(pipe, "a red circle", call, seed=0, warmup=0, repeats=1, device="cpu")
    assert _no_hooks_left(pipe)  # finite_outputs took its hooks away on the way out


def test_prompt_accuracy_of_a_pipeline_whose_transformer_gives_nan_names_the_transformer(nan_transformer_pipe):
    call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 2}
    with pytest.raises(NonFiniteError, match=r"^The transformer \(in torch\.bfloat16\) produced NaN"):
        quality.prompt_accuracy(nan_transformer_pipe, call, captions=2)
    assert _no_hooks_left(nan_transformer_pipe)


def test_finite_outputs_watches_the_transformer_t5_and_the_vae_decoder_only_inside_the_block(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    with finite_outputs(pipe):
        assert all(len(module._forward_hooks) == 1 for module in (pipe.transformer, pipe.text_encoder_2,
                                                                   pipe.vae.decoder))
        assert not pipe.text_encoder._forward_hooks and not pipe.vae._forward_hooks
    assert _no_hooks_left(pipe)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^The vae \(in torch\.bfloat16\) produced NaN.*decode in float32"):
        with finite_outputs(pipe):
            pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, 4, 4, dtype=torch.bfloat16))
    pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, 4, 4, dtype=torch.bfloat16))  # outside: no check


# --- compiled against eager ---------------------------------------------------------------------


def _at_sqnr(db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(compiled, eager): two tensors whose SQNR is `db`."""
    eager = torch.tensor([1.0, 0.0], dtype=torch.float64)
    return eager + torch.tensor([0.0, 10 ** (-db / 20)], dtype=torch.float64), eager


def test_a_compiled_output_agrees_with_eager_down_to_the_agreement_threshold():
    assert COMPILE_AGREEMENT_DB == 25.0
    identical = compare_compiled(torch.ones(4), torch.ones(4))
    assert identical == CompileCheck(float("inf"), None, True, "compiled and eager outputs agree (SQNR inf dB)")
    check = compare_compiled(*_at_sqnr(25.5))
    assert check.agrees and check.sqnr_db == pytest.approx(25.5) and check.own_error_db is None
    assert check.message == "compiled and eager outputs agree (SQNR 25.5 dB)"
    check = compare_compiled(*_at_sqnr(24.5))
    assert not check.agrees and check.sqnr_db == pytest.approx(24.5)
    assert check.message.startswith("COMPILED OUTPUT DISAGREES WITH EAGER: SQNR 24.5 dB, below the 25.0 dB that "
                                    "rounding explains; do not use")


def test_a_recipe_with_a_large_error_of_its_own_may_be_3_db_below_it():
    # an fp8 recipe 20 dB from bf16: compiling it may move it by as much as rounding explains there, to 17 dB
    check = compare_compiled(*_at_sqnr(17.5), own_error_db=20.0)
    assert check.agrees and check.own_error_db == 20.0
    check = compare_compiled(*_at_sqnr(16.5), own_error_db=20.0)
    assert not check.agrees
    assert "below the 17.0 dB that rounding explains (the recipe's own error is 20.0 dB)" in check.message
    # a recipe closer to bf16 than the threshold still needs the threshold, not its own error less 3 dB
    assert compare_compiled(*_at_sqnr(30.0), own_error_db=40.0).agrees
    assert not compare_compiled(*_at_sqnr(24.5), own_error_db=40.0).agrees


def test_a_compiled_output_with_nan_is_refused_not_compared():
    compiled, eager = _at_sqnr(40.0)
    compiled[0] = float("nan")
    with pytest.raises(NonFiniteError, match="The output holds NaN"):
        compare_compiled(compiled, eager)


# --- captured inputs ----------------------------------------------------------------------------


def test_capture_transformer_inputs_stops_at_the_first_call(tiny_pipe):
    calls = []
    handle = tiny_pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 3}
        inputs = quality.capture_transformer_inputs(tiny_pipe, "a red circle", call)
    finally:
        handle.remove()
    assert calls == []  # stopped before the transformer ran
    assert inputs["hidden_states"].shape == (1, 64, 64)  # 128x128 pixels -> 8x8 packed latents of 64 channels
    assert inputs["encoder_hidden_states"].shape == (1, 64, 256)
    assert inputs["return_dict"] is False
    with torch.no_grad():
        assert tiny_pipe.transformer(**inputs)[0].shape == (1, 64, 64)


def test_capture_linear_inputs_keeps_each_layers_first_input():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    captured = quality.capture_linear_inputs(model, lambda: (model(x), model(x + 1)))
    assert set(captured) == {"0", "2"}
    assert torch.equal(captured["0"], x)
    assert torch.equal(captured["2"], torch.relu(model[0](x)).detach())
    assert set(quality.capture_linear_inputs(model, lambda: model(x), names=["2"])) == {"2"}
