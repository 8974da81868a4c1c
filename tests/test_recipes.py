"""Tests for quantlab.recipes: the registry's library objects, hardware checks, loading and placing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import quantlab as ql
from quantlab import models, pipeline, recipes
from quantlab.env import DeviceInfo, UnsupportedHardwareError
from quantlab.measure import weights_bytes
from quantlab.quality import psnr_db
from quantlab.recipes import OFFLOAD_MODES, RECIPES, Speedups, get_recipe


def check_runs_here(name, device=None, dtype=None):
    """The one hardware check, as the tests below call it."""
    return get_recipe(name).check(device, dtype)


def needs_cuda(recipe) -> bool:
    return any(need.cuda or need.min_cc for need in recipe.needs())

CPU = DeviceInfo(kind="cpu", name="CPU (test, 2 cores)", bf16=True, fp8=False)
T4 = DeviceInfo(kind="cuda", name="Tesla T4", compute_capability=(7, 5), bf16=False, fp8=False)
A100 = DeviceInfo(kind="cuda", name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0), bf16=True, fp8=False)
H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), bf16=True, fp8=True)

QUANTO = ["quanto-int2", "quanto-int4", "quanto-int8", "quanto-float8"]


# --- quantization configs -----------------------------------------------------------------------


def _torchao_expected():
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {
        "torchao-int8wo": Int8WeightOnlyConfig,
        "torchao-int8dq": Int8DynamicActivationInt8WeightConfig,
        "torchao-int4wo": Int4WeightOnlyConfig,
        "torchao-float8wo": Float8WeightOnlyConfig,
        "torchao-float8dq-row": Float8DynamicActivationFloat8WeightConfig,
        "torchao-float8dq-tensor": Float8DynamicActivationFloat8WeightConfig,
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_quantization_config_classes(name):
    import diffusers
    import transformers

    recipe = RECIPES[name]
    config = recipe.quantization_config(torch.bfloat16)
    if recipe.backend in ("none", "layerwise", "gguf") or recipe.checkpoint:  # a checkpoint carries its own
        assert config is None
        return
    assert type(config) is diffusers.PipelineQuantizationConfig
    mapping = config.quant_mapping
    if recipe.backend in ("sdnq", "modelopt"):  # chapter 08: the transformer alone, quantized while it loads
        assert set(mapping) == {"transformer"}
        # diffusers.SDNQConfig is a factory that returns sdnq's own config class
        expected = "sdnq.quantizer.SDNQConfig" if recipe.backend == "sdnq" else \
            "diffusers.quantizers.quantization_config.NVIDIAModelOptConfig"
        config_class = type(mapping["transformer"])
        assert f"{config_class.__module__}.{config_class.__name__}" == expected
        return
    if recipe.low_ram is not None and recipe.storage[1] == "16bit":  # T5 encodes first in fp16, then is freed
        assert set(mapping) == {"transformer"}
        return
    assert set(mapping) == {"transformer", "text_encoder_2"}
    transformer, text_encoder_2 = mapping["transformer"], mapping["text_encoder_2"]
    if recipe.backend == "bitsandbytes":
        assert type(transformer) is diffusers.BitsAndBytesConfig
        assert type(text_encoder_2) is transformers.BitsAndBytesConfig
        is_8bit = name.startswith("bnb-8bit")
        for c in (transformer, text_encoder_2):
            assert c.load_in_8bit is is_8bit
            assert c.load_in_4bit is (not is_8bit)
    elif recipe.backend == "torchao":
        assert type(transformer) is diffusers.TorchAoConfig
        assert type(text_encoder_2) is transformers.TorchAoConfig
        expected = _torchao_expected()[name.split("+")[0]]
        assert type(transformer.quant_type) is expected
        assert type(text_encoder_2.quant_type) is expected
    elif recipe.backend == "quanto":
        assert type(transformer) is diffusers.QuantoConfig
        assert type(text_encoder_2) is transformers.QuantoConfig
        weights = name.split("+")[0].removeprefix("quanto-")
        assert transformer.weights_dtype == weights
        assert text_encoder_2.weights == weights
    else:
        pytest.fail(f"unexpected backend {recipe.backend!r}")


def test_torchao_config_details():
    from torchao.quantization import PerRow, PerTensor

    def quant_type(name):
        return get_recipe(name).quantization_config().quant_mapping["transformer"].quant_type

    assert quant_type("torchao-int4wo").group_size == 128
    row, tensor = quant_type("torchao-float8dq-row").granularity, quant_type("torchao-float8dq-tensor").granularity
    assert all(isinstance(g, PerRow) for g in row) and len(row) == 2
    assert all(isinstance(g, PerTensor) for g in tensor) and len(tensor) == 2


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if r.backend == "gguf"])
def test_gguf_recipes(name):
    from diffusers import GGUFQuantizationConfig

    recipe = RECIPES[name]
    assert recipe.quantization_config(torch.bfloat16) is None
    assert recipe.gguf_type in recipes.GGUF_TYPES
    assert name.split("+")[0].removesuffix("-encode-then-free") == f"gguf-{recipe.gguf_type.lower()}"
    for dtype in (torch.bfloat16, torch.float16):
        config = recipe.gguf_config(dtype)
        assert type(config) is GGUFQuantizationConfig
        assert config.compute_dtype == dtype


def test_gguf_config_is_none_for_other_recipes():
    assert get_recipe("bf16").gguf_config() is None
    assert get_recipe("quanto-int8").gguf_config() is None


def test_gguf_recipes_cover_every_type():
    assert sorted(r.gguf_type for r in RECIPES.values()
                  if r.backend == "gguf" and r.offload is None and r.low_ram is None) == sorted(
        recipes.GGUF_TYPES)


@pytest.mark.parametrize("name, quant_type, double, compute", [
    ("bnb-4bit-fp4", "fp4", False, None),
    ("bnb-4bit-nf4", "nf4", False, None),
    ("bnb-4bit-nf4-double", "nf4", True, None),
    ("bnb-4bit-nf4-fp32-compute", "nf4", False, torch.float32),
    ("bnb-4bit-nf4+model-offload", "nf4", False, None),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bnb_4bit_settings(name, quant_type, double, compute, dtype):
    mapping = get_recipe(name).quantization_config(dtype).quant_mapping
    for config in mapping.values():
        assert config.load_in_4bit is True
        assert config.bnb_4bit_quant_type == quant_type
        assert config.bnb_4bit_use_double_quant is double
        assert config.bnb_4bit_compute_dtype == (compute or dtype)


def test_layerwise_recipes():
    assert get_recipe("fp8-layerwise-e4m3").layerwise_storage_dtype == torch.float8_e4m3fn
    assert get_recipe("fp8-layerwise-e5m2").layerwise_storage_dtype == torch.float8_e5m2
    assert get_recipe("fp8-layerwise-e4m3+group-leaf-stream-offload").layerwise_storage_dtype == torch.float8_e4m3fn


def test_offload_variants():
    offloaded = {n: r for n, r in RECIPES.items() if r.offload is not None}
    assert {f"bf16+{mode}-offload" for mode in OFFLOAD_MODES} <= set(offloaded)
    for name, recipe in offloaded.items():
        assert recipe.offload in OFFLOAD_MODES
        assert name.removesuffix("+vae-tiling").endswith(f"+{recipe.offload}-offload")
        assert recipe.vae_tiling == name.endswith("+vae-tiling")
        assert needs_cuda(recipe)
    # an offloaded bnb recipe keeps bnb's own requirements (and its advice), first
    assert RECIPES["bnb-8bit+model-offload"].needs()[0] == RECIPES["bnb-8bit"].needs()[0]


# --- registry lookups ---------------------------------------------------------------------------


def test_get_recipe_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown recipe 'nope'") as error:
        get_recipe("nope")
    message = str(error.value)
    assert "Valid recipes: bf16, bnb-8bit, " in message
    assert "bnb-4bit-nf4" in message
    assert "quanto-int8" in message


def test_get_recipe_passes_recipes_through():
    recipe = RECIPES["quanto-int8"]
    assert get_recipe(recipe) is recipe
    assert get_recipe("quanto-int8") is recipe


def test_list_recipes():
    assert ql.list_recipes("quanto") == [*QUANTO, "quanto-int8-encode-then-free"]
    assert ql.list_recipes("torchao") == [*_torchao_expected(), "torchao-float8wo+compile",
                                          "torchao-float8dq-row+compile", "torchao-int8wo-encode-then-free"]
    assert ql.list_recipes() == list(RECIPES)
    assert ql.list_recipes("no-such-backend") == []
    assert ql.list_recipes("layerwise") == ["fp8-layerwise-e4m3", "fp8-layerwise-e5m2",
                                            "fp8-layerwise-e4m3+group-leaf-stream-offload",
                                            "fp8-layerwise-e4m3+group-leaf-stream-offload+vae-tiling"]


def test_smallest_footprint_candidates_tile_the_vae_and_need_a_gpu():
    tiled = {n for n, r in RECIPES.items() if r.vae_tiling}
    assert tiled == {"bf16+sequential-offload+vae-tiling", "bnb-4bit-nf4+model-offload+vae-tiling",
                     "gguf-q2_k+group-leaf-stream-offload+vae-tiling",
                     "fp8-layerwise-e4m3+group-leaf-stream-offload+vae-tiling"}
    assert all(needs_cuda(RECIPES[n]) for n in tiled)
    # GGUF cannot be sequentially offloaded (measured on an H100), so no recipe offers it
    assert not any(r.gguf_type and r.offload == "sequential" for r in RECIPES.values())


def test_load_pipeline_tiles_the_vae_when_the_recipe_says_so():
    recipe = dataclasses.replace(get_recipe("bf16"), name="bf16+vae-tiling", vae_tiling=True)
    pipe = ql.load_pipeline("tiny", recipe, device="cpu")
    assert pipe.vae.use_tiling is True
    assert ql.load_pipeline("tiny", "bf16", device="cpu").vae.use_tiling is False


def test_gguf_with_sequential_offload_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(ql.models, "model_path", lambda *a, **k: pytest.fail("must not reach the model"))
    recipe = dataclasses.replace(get_recipe("gguf-q2_k"), name="gguf-q2_k+sequential-offload", offload="sequential")
    with pytest.raises(ValueError, match="sequential offload cannot move GGUF weights") as error:
        ql.load_pipeline("tiny", recipe, device="cpu", gguf_file="unused.gguf")
    assert "group-leaf-stream-offload" in str(error.value)


def test_balanced_placement_needs_a_gpu_and_says_what_to_do():
    recipe = get_recipe("bf16+balanced")
    assert recipe.device_map == "balanced" and recipe.offload is None
    with pytest.raises(ql.UnsupportedHardwareError, match="device_map='balanced'") as error:
        ql.load_pipeline("tiny", recipe, device="cpu")
    assert "bf16+model-offload" in str(error.value)


# --- check_runs_here ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bnb-8bit", "bnb-4bit-nf4", "bnb-8bit+model-offload"])
def test_bnb_needs_cuda(name):
    with pytest.raises(UnsupportedHardwareError) as error:
        check_runs_here(name, CPU)
    message = str(error.value)
    assert "needs a CUDA GPU" in message
    assert "Linear8bitLt" in message
    assert CPU.label in message


def test_unsupported_hardware_error_is_a_runtime_error():
    assert issubclass(UnsupportedHardwareError, RuntimeError)


@pytest.mark.parametrize("name", ["torchao-float8dq-row", "torchao-float8dq-tensor", "torchao-float8wo"])
def test_fp8_needs_cc_89(name):
    with pytest.raises(UnsupportedHardwareError) as error:
        check_runs_here(name, A100, torch.bfloat16)
    message = str(error.value)
    assert "8.9" in message
    assert "8.0" in message  # what the A100 has
    assert "torchao-int8wo" in message  # the alternative
    check_runs_here(name, H100, torch.bfloat16)  # passes
    check_runs_here(name, DeviceInfo(kind="cuda", name="L4", compute_capability=(8, 9)), torch.bfloat16)


def test_fp8_on_cpu_asks_for_cuda_first():
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        check_runs_here("torchao-float8dq-row", CPU)


def test_bf16_on_t4_raises_and_fp16_passes():
    with pytest.raises(UnsupportedHardwareError) as error:
        check_runs_here("bf16", T4, torch.bfloat16)
    assert "float16" in str(error.value)
    assert "Tesla T4 (cc 7.5)" in str(error.value)
    check_runs_here("bf16", T4, torch.float16)
    check_runs_here("bf16", T4)  # no dtype given: nothing to check
    check_runs_here("bnb-4bit-nf4", T4, torch.float16)  # bitsandbytes runs on a T4


def test_cpu_friendly_recipes_pass_on_cpu():
    for name in ["bf16", "torchao-int8wo", "torchao-int8dq", *QUANTO, "gguf-q4_0", "fp8-layerwise-e4m3"]:
        check_runs_here(name, CPU, torch.bfloat16)


@pytest.mark.parametrize("name", [n for n, r in RECIPES.items() if r.offload is not None])
def test_offload_recipes_raise_on_cpu(name):
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        check_runs_here(name, CPU, torch.bfloat16)
    check_runs_here(name, H100, torch.bfloat16)


def test_check_runs_here_unknown_recipe():
    with pytest.raises(ValueError, match="Unknown recipe"):
        check_runs_here("nope", CPU)


# --- load_pipeline: checks before loading ---------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Make any attempt to locate or build model weights fail loudly."""

    def fail(*args, **kwargs):
        raise AssertionError("model_path was called: a check came after loading started")

    monkeypatch.setattr(models, "model_path", fail)


def test_load_pipeline_unknown_model(no_loading):
    with pytest.raises(ValueError, match="Unknown model 'flux-9000'") as error:
        ql.load_pipeline("flux-9000", device="cpu")
    assert "tiny" in str(error.value)


def test_load_pipeline_unknown_recipe(no_loading):
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        ql.load_pipeline("tiny", "nope", device="cpu")


def test_load_pipeline_bnb_on_cpu_fails_before_loading(no_loading):
    with pytest.raises(UnsupportedHardwareError, match="needs a CUDA GPU"):
        ql.load_pipeline("tiny", "bnb-4bit-nf4", device="cpu")


def test_load_pipeline_gpu_only_model_on_cpu(no_loading):
    with pytest.raises(UnsupportedHardwareError, match="QUANTLAB_MODEL=tiny"):
        ql.load_pipeline("flux-dev-shaped", "bf16", device="cpu")


def test_load_pipeline_gguf_needs_file(no_loading):
    with pytest.raises(ValueError, match="gguf_file") as error:
        ql.load_pipeline("tiny", "gguf-q4_0", device="cpu")
    assert "Q4_0" in str(error.value)


def test_load_pipeline_gguf_missing_file(tiny_path, tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        ql.load_pipeline("tiny", "gguf-q4_0", device="cpu", gguf_file=missing)


def test_load_pipeline_gguf_missing_file_fails_before_loading(no_loading, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        ql.load_pipeline("tiny", "gguf-q4_0", device="cpu", gguf_file=tmp_path / "missing.gguf")


# --- load_pipeline: real loads of the tiny model ---------------------------------------------------


def _generate(pipe, steps: int = 2):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": steps}
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a red circle on a blue background", generator=generator, **kwargs).images[0]


@pytest.fixture(scope="module")
def bf16_reference(tiny_pipe):
    return _generate(tiny_pipe)


def test_load_pipeline_quanto_int8(tiny_pipe, bf16_reference):
    from optimum.quanto import QBytesTensor

    pipe = ql.load_pipeline("tiny", "quanto-int8", device="cpu")
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.weight, QBytesTensor)
    assert to_q.weight._data.dtype == torch.int8
    ratio = weights_bytes(pipe.transformer) / weights_bytes(tiny_pipe.transformer)
    assert 0.5 <= ratio <= 0.6
    # text_encoder_2 (T5) is quantized too, except the FF output projections `wo`, which transformers
    # leaves unquantized (T5's _keep_in_fp32_modules); the CLIP text encoder and the VAE are untouched
    t5_layer = pipe.text_encoder_2.encoder.block[0].layer
    assert isinstance(t5_layer[0].SelfAttention.q.weight, QBytesTensor)
    assert isinstance(t5_layer[1].DenseReluDense.wi_0.weight, QBytesTensor)
    assert not isinstance(t5_layer[1].DenseReluDense.wo.weight, QBytesTensor)
    t5_ratio = weights_bytes(pipe.text_encoder_2) / weights_bytes(tiny_pipe.text_encoder_2)
    assert 0.6 <= t5_ratio <= 0.7
    assert weights_bytes(pipe.text_encoder) == weights_bytes(tiny_pipe.text_encoder)
    assert weights_bytes(pipe.vae) == weights_bytes(tiny_pipe.vae)
    image = _generate(pipe)
    assert image.size == bf16_reference.size == (128, 128)
    assert psnr_db(image, bf16_reference) > 25
    assert psnr_db(image, bf16_reference) != float("inf")  # it did change something


def test_load_pipeline_fp8_layerwise(tiny_pipe, bf16_reference):
    pipe = ql.load_pipeline("tiny", "fp8-layerwise-e4m3", device="cpu")
    transformer = pipe.transformer
    block = transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert block.ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert transformer.single_transformer_blocks[0].proj_mlp.weight.dtype == torch.float8_e4m3fn
    # diffusers' default skip patterns ("norm", "pos_embed", "^proj_out$", ...) keep these in bf16;
    # note that "norm" also matches the AdaLN modulation Linears (norm1.linear), which are large
    assert block.attn.norm_q.weight.dtype == torch.bfloat16
    assert block.norm1.linear.weight.dtype == torch.bfloat16
    assert transformer.norm_out.linear.weight.dtype == torch.bfloat16
    assert transformer.proj_out.weight.dtype == torch.bfloat16
    # the other components are untouched
    assert pipe.text_encoder_2.dtype == torch.bfloat16
    assert weights_bytes(pipe.vae) == weights_bytes(tiny_pipe.vae)
    # every fp8 element saves exactly one byte against bf16
    fp8_elements = sum(p.numel() for p in transformer.parameters() if p.dtype == torch.float8_e4m3fn)
    bf16_bytes = weights_bytes(tiny_pipe.transformer)
    assert weights_bytes(transformer) == bf16_bytes - fp8_elements
    # ... which is about 63% of bf16 for the tiny model, since the AdaLN Linears stay bf16
    # (the FLUX.1-dev shape has the same proportions: about 0.63 too)
    ratio = weights_bytes(transformer) / bf16_bytes
    assert 0.6 <= ratio <= 0.67
    image = _generate(pipe)
    assert psnr_db(image, bf16_reference) > 25


# --- place_pipeline -----------------------------------------------------------------------------


class _RecordingPipe:
    """Stands in for a pipeline: records which placement method was called, with what."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self if name == "to" else None

        return method


def test_place_pipeline_unknown_mode_lists_modes():
    pipe = _RecordingPipe()
    with pytest.raises(ValueError, match="Unknown offload mode 'disk'") as error:
        pipeline.place_pipeline(pipe, "cpu", "disk")
    assert ", ".join(OFFLOAD_MODES) in str(error.value)
    assert pipe.calls == []


def test_place_pipeline_rejects_unknown_group_mode():
    pipe = _RecordingPipe()
    with pytest.raises(ValueError, match="Unknown offload mode"):
        pipeline.place_pipeline(pipe, "cuda", "group-bogus")
    assert pipe.calls == []


def test_place_pipeline_calls():
    pipe = _RecordingPipe()
    assert pipeline.place_pipeline(pipe, "cpu") is pipe
    assert pipe.calls == [("to", ("cpu",), {})]

    pipe = _RecordingPipe()
    assert pipeline.place_pipeline(pipe, "cuda", "model") is pipe
    assert pipe.calls == [("enable_model_cpu_offload", (), {"device": "cuda"})]

    pipe = _RecordingPipe()
    pipeline.place_pipeline(pipe, "cuda", "sequential")
    assert pipe.calls == [("enable_sequential_cpu_offload", (), {"device": "cuda"})]

    expected = {
        "group-block": {"offload_type": "block_level", "use_stream": False, "num_blocks_per_group": 1},
        "group-leaf": {"offload_type": "leaf_level", "use_stream": False},
        "group-leaf-stream": {"offload_type": "leaf_level", "use_stream": True},
    }
    for mode, want in expected.items():
        pipe = _RecordingPipe()
        pipeline.place_pipeline(pipe, "cuda", mode)
        [(name, args, kwargs)] = pipe.calls
        assert name == "enable_group_offload" and args == ()
        assert kwargs == {"onload_device": torch.device("cuda"), "offload_device": torch.device("cpu"), **want}, mode


def test_why_not_here_gives_the_reason_or_none():
    t4 = ql.env.describe_gpu("Tesla T4", (7, 5))
    assert ql.recipes.why_not_here("bnb-4bit-nf4", t4) is None
    assert "compute capability 8.9" in ql.recipes.why_not_here("torchao-float8dq-row", t4)
    cpu = ql.env.DeviceInfo("cpu", "test CPU")
    assert "needs a CUDA GPU" in ql.recipes.why_not_here("bnb-8bit", cpu)
    assert "float16 instead" in ql.recipes.why_not_here("bf16", t4, torch.bfloat16)
