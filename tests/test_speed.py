"""Speed recipes: names, hardware checks, the FLOP floor, amortization, and applying them to the tiny model."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import quantlab as ql
from quantlab import speed
from quantlab.env import DeviceInfo

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), bf16=True, fp8=True)
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5), bf16=False, fp8=False)
CPU = DeviceInfo("cpu", "CPU (x86_64, 2 cores)")
L40S = DeviceInfo("cuda", "NVIDIA L40S", (8, 9), bf16=True, fp8=True)
FASTEST_ON_HOPPER = ("float8static-tensor+fused-qkv+attn-fa3-fp8+gelu-sigmoid+rope-kernel+single-block-kernels"
                     "+compile-regional+cuda-graph")  # H200
FASTEST_WITHOUT_TRITON = FASTEST_ON_HOPPER.replace("+rope-kernel+single-block-kernels", "")  # before the kernels
FASTEST_WITHOUT_FA3 = "float8dq-row+fused-qkv+attn-cudnn+compile-regional+cuda-graph"


@pytest.fixture
def fa3_installed(monkeypatch):
    """Pretend the fa3-fwd package is installed and loads (it loads only where a CUDA 13 runtime is)."""
    monkeypatch.setattr(speed, "_fa3_problem", lambda: None)


@pytest.fixture
def triton_installed(monkeypatch):
    """Pretend Triton and a CUDA GPU are here, for the rope kernel (PyTorch's CUDA builds bring Triton)."""
    monkeypatch.setattr(speed.kernels, "triton_problem", lambda: None)


@pytest.fixture
def fa3_missing(monkeypatch):
    monkeypatch.setattr(speed, "_fa3_problem", lambda: "not installed here")


@pytest.fixture(autouse=True)
def keep_the_default_attention_backend():
    """`set_attention_backend` also sets diffusers' process-wide default: put it back after each test."""
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("native"):
        yield


def test_a_name_reads_as_its_steps():
    recipe = speed.parse_speed_recipe("float8dq-tensor+fused-qkv+attn-cudnn+compile-regional-max-autotune")
    assert (recipe.quantization, recipe.fuse_qkv, recipe.attention) == ("float8dq-tensor", True, "cudnn")
    assert (recipe.compile_mode, recipe.regional, recipe.fp8) == ("max-autotune", True, True)
    whole = speed.parse_speed_recipe("int8dq+compile+vae-channels-last")
    assert (whole.compile_mode, whole.regional, whole.fp8, whole.vae_channels_last) == ("default", False, False, True)
    assert speed.parse_speed_recipe("bf16") == speed.SpeedRecipe("bf16")


def test_a_cuda_graph_replays_regional_blocks_or_an_eager_forward_pass():
    recipe = speed.parse_speed_recipe("float8dq-row+fused-qkv+attn-cudnn+compile-regional+cuda-graph")
    assert recipe.cuda_graph and recipe.regional and recipe.fp8
    assert speed.parse_speed_recipe("bf16+cuda-graph").cuda_graph
    # a whole-model compile replaces the forward pass that the graph would record
    with pytest.raises(ValueError, match="compile-reduce-overhead"):
        speed.parse_speed_recipe("bf16+compile+cuda-graph")
    with pytest.raises(ql.UnsupportedHardwareError, match="CUDA graph records CUDA kernels"):
        speed.check_speed_recipe("bf16+compile-regional+cuda-graph", CPU)
    speed.check_speed_recipe("bf16+compile-regional+cuda-graph", T4)


def test_inductor_flags_are_set_for_a_compile_and_put_back_by_the_runner(tiny_pipe, monkeypatch):
    import torch._inductor.config as inductor_config

    with pytest.raises(ValueError, match="add a compile step"):
        speed.parse_speed_recipe("bf16+inductor-flags")
    before = {flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS}
    assert before != speed.INDUCTOR_FLAGS
    seen = {}

    def apply_only(recipe, *args):  # the runner's timing, less the compiling and timing, which cost a minute here
        speed.apply_speed_recipe(copy.deepcopy(tiny_pipe.transformer), recipe, CPU)
        seen.update({flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS})
        inductor_config.force_fuse_int_mm_with_mul = True  # as torchao's fp8 configs do, for the whole process

    monkeypatch.setattr(speed, "_time_speed_recipe", apply_only)
    fused_before = inductor_config.force_fuse_int_mm_with_mul
    speed.run_speed_recipe("bf16+inductor-flags+compile-regional", "tiny", device="cpu")
    assert seen == speed.INDUCTOR_FLAGS  # what the compile would have seen
    assert {flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS} == before
    assert inductor_config.force_fuse_int_mm_with_mul == fused_before  # the next recipe starts from the defaults


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records a CUDA graph")
def test_a_replayed_cuda_graph_gives_the_recorded_forward_pass_output(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer).to("cuda")
    config = transformer.config
    small, large = (ql.measure.random_transformer_inputs(config, size, size, 32, device="cuda", seed=seed)
                    for size, seed in ((128, 1), (256, 2)))
    with torch.no_grad():
        expected = [transformer(**inputs)[0] for inputs in (small, large)]
        speed.apply_speed_recipe(transformer, "bf16+cuda-graph")
        assert isinstance(transformer.forward, speed.CudaGraphForward)
        first = transformer(**small)[0]
        again = transformer(**large)[0], transformer(**small)[0]
    assert len(transformer.forward.graphs) == 2  # one recording per input shape
    for output, reference in zip((first, *again), (expected[0], expected[1], expected[0])):
        assert output.shape == reference.shape and ql.measure.sqnr_db(output, reference) > 40
    assert first.data_ptr() != again[1].data_ptr()  # a copy, not the recorded tensor the next replay overwrites


@pytest.mark.parametrize("name, words", [
    ("fp16", "must start with the weights"),
    ("bf16+compile-fast", "Unknown compile mode 'fast'"),
    ("bf16+attn-sage", "Unknown step 'attn-sage'"),
])
def test_a_bad_name_says_what_is_valid(name, words):
    with pytest.raises(ValueError, match=words):
        speed.parse_speed_recipe(name)


def test_hardware_checks_come_first():
    speed.check_speed_recipe(FASTEST_WITHOUT_FA3, H100)
    with pytest.raises(ql.UnsupportedHardwareError, match="compute capability 8.9"):
        speed.check_speed_recipe("float8dq-row+compile", T4)
    with pytest.raises(ql.UnsupportedHardwareError, match="attn-native"):
        speed.check_speed_recipe("bf16+attn-cudnn", CPU)
    with pytest.raises(ql.UnsupportedHardwareError, match="8.0"):
        speed.check_speed_recipe("bf16+attn-flash", T4)
    speed.check_speed_recipe("bf16+attn-efficient", T4)
    speed.check_speed_recipe("int8dq+fused-qkv+attn-math+compile-regional", CPU)


def test_the_floor_of_flux_dev_is_74_tflop_per_step():
    tflop = speed.transformer_tflop_per_step(ql.models.meta_component("flux-dev-shaped", "transformer"))
    assert tflop["total_tflop"] == pytest.approx(74.38, abs=0.01)
    # attention by hand: 57 blocks × 2 matmuls × 2 FLOP × 4608² tokens × 3072 channels
    assert tflop["attention_tflop"] == pytest.approx(57 * 4 * 4608**2 * 3072 / 1e12)
    assert speed.floor_ms_per_step(tflop, "NVIDIA H100 80GB HBM3") == pytest.approx(75.2, abs=0.1)
    assert speed.floor_ms_per_step(tflop, "NVIDIA H200", fp8_linears=True) == pytest.approx(45.1, abs=0.1)
    assert speed.floor_ms_per_step(tflop, "NVIDIA H100 PCIe") == pytest.approx(98.4, abs=0.1)
    assert speed.floor_ms_per_step(tflop, "Tesla T4") is None  # no bf16 there
    assert speed.floor_ms_per_step(tflop, "a GPU we do not know") is None


def test_fused_projections_do_the_same_flops():
    transformer = ql.models.meta_component("tiny", "transformer")
    before = speed.transformer_tflop_per_step(transformer, 128, 128, 32)
    transformer.fuse_qkv_projections()
    assert speed.transformer_tflop_per_step(transformer, 128, 128, 32) == pytest.approx(before)


def test_compile_time_is_paid_back_after_the_break_even_image():
    assert speed.amortized_s_per_image(compile_s=100.0, s_per_image=5.0, images=20) == pytest.approx(10.0)
    assert speed.break_even_images(compile_s=100.0, eager_s_per_image=9.0, compiled_s_per_image=7.0) == 50.0
    assert speed.break_even_images(compile_s=100.0, eager_s_per_image=7.0, compiled_s_per_image=9.0) is None


def test_the_fastest_measured_recipe_depends_on_the_device(fa3_installed, triton_installed):
    assert speed.fastest_recipe(H100) == FASTEST_ON_HOPPER
    assert speed.fastest_recipe(L40S) == FASTEST_WITHOUT_FA3  # fp8, but FA3 is for Hopper only
    # without fp8, whole and regional bf16 compiles are within 1% (134 and 135 ms): the one that compiles
    # 7x faster wins, unless the tolerance is set to zero
    assert speed.fastest_recipe(CPU) == "bf16+compile-regional"
    assert speed.fastest_recipe(CPU, tolerance=0.0) == "bf16+compile"
    assert speed.fastest_recipe(T4) == "bf16+compile-regional"


def test_without_fa3_installed_the_fastest_recipe_is_the_fastest_without_it(fa3_missing):
    assert speed.fastest_recipe(H100) == FASTEST_WITHOUT_FA3
    assert speed.fastest_recipe(H100, packages=False) == FASTEST_ON_HOPPER  # the hardware alone


def test_without_triton_the_fastest_recipe_leaves_out_the_rope_kernel(fa3_installed, monkeypatch):
    monkeypatch.setattr(speed.kernels, "triton_problem", lambda: "Triton is not installed")
    assert speed.fastest_recipe(H100) == FASTEST_WITHOUT_TRITON


def test_fa3_needs_hopper_and_its_package(fa3_installed, triton_installed, monkeypatch):
    recipe = speed.parse_speed_recipe(FASTEST_ON_HOPPER)
    assert (recipe.quantization, recipe.attention, recipe.fp8) == ("float8static-tensor", "fa3-fp8", True)
    assert speed.parse_speed_recipe("bf16+attn-fa3").attention == "fa3"
    speed.check_speed_recipe(FASTEST_ON_HOPPER, H100)
    for device in (L40S, T4, CPU):
        with pytest.raises(ql.UnsupportedHardwareError, match="Hopper GPUs .compute capability 9.0.*attn-cudnn"):
            speed.check_speed_recipe("bf16+attn-fa3", device)
    monkeypatch.setattr(speed, "_fa3_problem", lambda: "not installed here")
    with pytest.raises(ql.UnsupportedHardwareError, match=r"which is not installed here.*pip install fa3-fwd==0\.0\.3"):
        speed.check_speed_recipe("bf16+attn-fa3-fp8", H100)
    speed.check_speed_recipe("bf16+attn-fa3-fp8", H100, packages=False)


def test_fa3_that_is_missing_or_does_not_load_is_named(monkeypatch):
    import importlib
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert speed._fa3_problem() == "not installed here"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())

    def no_cuda_13(name, *args):
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", no_cuda_13)
    assert speed._fa3_problem().startswith("installed here but does not load (OSError: libcudart.so.13")


class SdpaInPlaceOfFa3(speed.FlashAttention3Processor):
    """The FA3 processor with PyTorch's attention where FA3 would run, and fp8 emulated by rounding."""

    def attention(self, query, key, value):
        if self.fp8:  # the rope kernel's q, k and v arrive in fp8 already; these tests run in float32
            query, key, value = (x.to(torch.float8_e4m3fn).float() for x in (query, key, value))
        return torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (query, key, value))).transpose(1, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_the_fa3_processor_is_diffusers_flux_attention_around_another_kernel(tiny_pipe, fused):
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    if fused:
        transformer.fuse_qkv_projections()
    inputs = ql.measure.random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
    with torch.no_grad():
        reference = transformer(**inputs)[0]
        transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=False))
        same = transformer(**inputs)[0]
        transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=True))
        rounded = transformer(**inputs)[0]
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert set(map(type, transformer.attn_processors.values())) == {SdpaInPlaceOfFa3}
    assert len(transformer.attn_processors) == blocks  # every double- and single-stream block
    assert torch.equal(same, reference)  # every step around the attention call is diffusers' own
    assert 30 < ql.measure.sqnr_db(rounded, reference) < 60  # e4m3 keeps 3 mantissa bits of q, k and v


def test_the_rope_kernel_step_needs_fused_qkv_fp8_fa3_and_triton(fa3_installed, monkeypatch):
    name = "float8static-tensor+fused-qkv+attn-fa3-fp8+rope-kernel+compile-regional+cuda-graph"
    assert speed.parse_speed_recipe(name).rope_kernel
    for without in ("+fused-qkv", "+attn-fa3-fp8"):
        with pytest.raises(ValueError, match="add fused-qkv and attn-fa3-fp8"):
            speed.parse_speed_recipe(name.replace(without, ""))
    monkeypatch.setattr(speed.kernels, "triton_problem", lambda: "Triton is not installed")
    with pytest.raises(ql.UnsupportedHardwareError, match="rope-kernel is a Triton kernel for CUDA GPUs, and Triton "
                                                          "is not installed"):
        speed.check_speed_recipe(name, H100)
    speed.check_speed_recipe(name, H100, packages=False)  # the hardware alone would run it
    monkeypatch.setattr(speed.kernels, "triton_problem", lambda: None)
    speed.check_speed_recipe(name, H100)


def test_the_processor_gives_the_rope_kernel_each_stream_with_its_norms(tiny_pipe, monkeypatch):
    """The kernel's own arithmetic is checked on a GPU (test_the_rope_kernel_matches_diffusers_on_a_gpu)."""
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    inputs = ql.measure.random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="use it with fp8=True"):
        SdpaInPlaceOfFa3(fp8=False, rope_kernel=True)
    calls = []

    def reference(*args, **kwargs):  # what the kernel computes, in PyTorch
        calls.append(len(args))
        return ql.kernels.qk_norm_rope_reference(*args, **kwargs)

    monkeypatch.setattr(speed.kernels, "qk_norm_rope_fp8", reference)
    with torch.no_grad():
        transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=True, rope_kernel=True))
        with pytest.raises(ValueError, match="fuse_qkv_projections"):
            transformer(**inputs)
        transformer.fuse_qkv_projections()
        fused = transformer(**inputs)[0]
        transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=True))
        unfused = transformer(**inputs)[0]
    double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    assert calls == [8] * double + [5] * single  # the double-stream blocks pass their text stream and its norms
    assert torch.equal(fused, unfused)


def test_the_rope_kernel_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(ql.kernels, "_TRITON", False)
    assert "Triton is not installed" in ql.kernels.triton_problem()
    monkeypatch.setattr(ql.kernels, "_TRITON", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ql.kernels.triton_problem() == "there is no CUDA GPU here"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert re.search(r"compute capability 7\.5, and the kernel writes fp8.*8\.9\+", ql.kernels.triton_problem())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 or H200
    assert ql.kernels.triton_problem() is None


def _differ_by_one_fp8_step_at_most(output: torch.Tensor, reference: torch.Tensor) -> None:
    output, reference = output.float(), reference.float()
    differ = output != reference
    assert differ.float().mean() < 2e-3  # float32 sums in another order flip a rounding now and then
    assert ((output - reference).abs()[differ] <= reference.abs()[differ] / 8 + 2**-9).all()  # by one fp8 step


@pytest.mark.skipif(ql.kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
@pytest.mark.parametrize("text_tokens", [0, 40])
def test_the_rope_kernel_matches_diffusers_on_a_gpu(text_tokens):
    heads, head_dim, image_tokens = 3, 128, 70  # token counts that leave a partial block of BLOCK_TOKENS
    generator = torch.Generator("cpu").manual_seed(0)
    norms = [torch.nn.RMSNorm(head_dim, eps=1e-6) for _ in range(4)]
    for norm in norms:
        norm.weight.data = torch.rand(head_dim, generator=generator) + 0.5
        norm.to("cuda", torch.bfloat16)
    qkv, text = (torch.randn(2, n, 3 * heads * head_dim, generator=generator).to("cuda", torch.bfloat16) * 3
                 for n in (image_tokens, text_tokens))
    angles = torch.rand(text_tokens + image_tokens, head_dim // 2, generator=generator) * 6
    rotary = tuple(f(angles).repeat_interleave(2, dim=1).cuda() for f in (torch.cos, torch.sin))
    streams = dict(text_qkv=text, text_q_norm=norms[2], text_k_norm=norms[3]) if text_tokens else {}
    with torch.no_grad():
        outputs = ql.kernels.qk_norm_rope_fp8(qkv, norms[0], norms[1], rotary, heads, **streams)
        references = ql.kernels.qk_norm_rope_reference(qkv, norms[0], norms[1], rotary, heads, **streams)
    for output, reference in zip(outputs, references):
        assert output.shape == (2, text_tokens + image_tokens, heads, head_dim) and output.dtype == torch.float8_e4m3fn
        _differ_by_one_fp8_step_at_most(output, reference)
    assert torch.equal(outputs[2].float(), references[2].float())  # v is a plain cast


@pytest.mark.skipif(ql.kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
def test_the_rope_kernel_compiles_in_one_graph_to_what_it_gives_eagerly():
    """Inside a compiled block, torch.compile traces the launch (fullgraph: no break) and runs the same kernel."""
    heads, head_dim, tokens = 2, 128, 48
    norm = torch.nn.RMSNorm(head_dim, eps=1e-6).to("cuda", torch.bfloat16)
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    rotary = (torch.ones(tokens, head_dim, device="cuda"), torch.zeros(tokens, head_dim, device="cuda"))
    compiled = torch.compile(ql.kernels.qk_norm_rope_fp8, fullgraph=True)
    for eager, traced in zip(ql.kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, heads),
                             compiled(qkv, norm, norm, rotary, heads)):
        assert torch.equal(eager.view(torch.uint8), traced.view(torch.uint8))


def test_the_rope_kernel_checks_its_arguments_then_says_what_it_needs_where_it_cannot_run():
    norm, other_eps = torch.nn.RMSNorm(128, eps=1e-6), torch.nn.RMSNorm(128, eps=1e-5)
    qkv, rotary = torch.zeros(1, 4, 384), (torch.ones(4, 128), torch.zeros(4, 128))
    with pytest.raises(ValueError, match=r"shape \(3, 128\); the tokens and head_dim want \(4, 128\)"):
        ql.kernels.qk_norm_rope_fp8(qkv, norm, norm, tuple(x[:3] for x in rotary), 1)
    with pytest.raises(ValueError, match=r"last dimension \(288\) must be 3 × 1 heads × a head_dim that is a power"):
        ql.kernels.qk_norm_rope_fp8(torch.zeros(1, 4, 288), norm, norm, rotary, 1)  # a head_dim of 96
    with pytest.raises(ValueError, match=r"last dimension \(384\) must be 3 × 5 heads"):
        ql.kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, 5)  # 384 is not a multiple of 15
    with pytest.raises(ValueError, match="one RMSNorm eps.*1e-06, another 1e-05"):
        ql.kernels.qk_norm_rope_fp8(qkv, norm, other_eps, rotary, 1)
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: qk_norm_rope_reference"):
        ql.kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, 1)  # CPU tensors, here or on a GPU machine


SINGLE_BLOCK_KERNELS = "float8static-tensor+fused-qkv+attn-fa3-fp8+rope-kernel+single-block-kernels"


def test_the_single_block_kernels_step_needs_static_fp8_the_rope_kernel_and_triton(fa3_installed, monkeypatch):
    assert speed.parse_speed_recipe(SINGLE_BLOCK_KERNELS).single_block_kernels
    for recipe in (SINGLE_BLOCK_KERNELS.replace("float8static-tensor", "float8dq-tensor"),  # no scales in advance
                   SINGLE_BLOCK_KERNELS.replace("+rope-kernel", "")):
        with pytest.raises(ValueError, match="start with float8static-tensor, and add fused-qkv, attn-fa3-fp8 and "
                                             "rope-kernel"):
            speed.parse_speed_recipe(recipe)
    assert speed.parse_speed_recipe(SINGLE_BLOCK_KERNELS + "+fused-qkv-mlp").fused_qkv_mlp
    with pytest.raises(ValueError, match="fused-qkv-mlp joins two Linears that only the single-block kernels' "
                                         "forward calls as one matmul.*add single-block-kernels"):
        speed.parse_speed_recipe(SINGLE_BLOCK_KERNELS.replace("single-block-kernels", "fused-qkv-mlp"))
    monkeypatch.setattr(speed.kernels, "triton_problem", lambda: "there is no CUDA GPU here")
    with pytest.raises(ql.UnsupportedHardwareError, match="rope-kernel and single-block-kernels run Triton kernels "
                                                          "for CUDA GPUs, and there is no CUDA GPU here"):
        speed.check_speed_recipe(SINGLE_BLOCK_KERNELS, H100)


@pytest.fixture
def twins_of_the_kernels(fa3_installed, triton_installed, monkeypatch):
    """Each Triton kernel replaced by its PyTorch twin, and PyTorch's attention where FA3 runs; yields the calls."""
    calls = []
    for name in ("qk_norm_rope", "layer_norm_modulate", "gelu_cat"):
        reference = getattr(ql.kernels, f"{name}_reference")
        monkeypatch.setattr(speed.kernels, f"{name}_fp8",
                            lambda *args, _reference=reference, _name=name, **kwargs: (calls.append(_name),
                                                                                      _reference(*args, **kwargs))[1])
    monkeypatch.setattr(speed, "FlashAttention3Processor", SdpaInPlaceOfFa3)
    return calls


def test_the_single_block_kernels_compute_what_diffusers_block_computes(tiny_pipe, twins_of_the_kernels):
    """The kernels' own arithmetic is checked on a GPU (test_the_single_block_kernels_match_their_references...)."""
    import torch._inductor.config as inductor_config

    calls = twins_of_the_kernels
    config = tiny_pipe.transformer.config
    inputs = ql.measure.random_transformer_inputs(config, 128, 128, 32)
    calibration = [ql.measure.random_transformer_inputs(config, 128, 128, 32, seed=seed) for seed in (1, 2)]
    outputs, transformers = {}, {}
    for name in (SINGLE_BLOCK_KERNELS.replace("+single-block-kernels", ""), SINGLE_BLOCK_KERNELS,
                 SINGLE_BLOCK_KERNELS + "+fused-qkv-mlp"):
        transformer = transformers[name] = copy.deepcopy(tiny_pipe.transformer)
        with inductor_config.patch(coordinate_descent_tuning=False), torch.no_grad():
            speed.apply_speed_recipe(transformer, name, H100, calibrate=lambda: [transformer(**c) for c in calibration])
            calls.clear()
            outputs[name] = transformer(**inputs)[0]
            single = ["layer_norm_modulate", "qk_norm_rope", "gelu_cat"] if "single-block" in name else ["qk_norm_rope"]
            assert calls == ["qk_norm_rope"] * len(transformer.transformer_blocks) + single * len(
                transformer.single_transformer_blocks)
    without, with_kernels, with_one_matmul = outputs.values()
    assert torch.equal(without, with_kernels)  # the same steps, the same roundings, the same scales
    assert torch.equal(with_kernels, with_one_matmul)  # each Linear keeps its scales in the one matmul
    block = transformers[SINGLE_BLOCK_KERNELS].single_transformer_blocks[0]
    weight = block.proj_out.weight  # the torchao weight stays; the kernels' operands share its memory
    assert block.proj_out.fp8_weight_t.data_ptr() == weight.qdata.data_ptr()
    assert block.proj_out.fp8_input_scale.item() == weight.act_quant_scale.item()
    assert not hasattr(block, "fp8_qkv_mlp_weight_t")
    assert speed.use_single_block_kernels(transformer) == 0  # installed once
    assert speed.fuse_single_block_projections(transformer) == 0
    # the kernels' operands view the torchao weights, and the joined weight is the Linears' own memory: only the
    # joined bias and the scales per output feature (bf16 and float32, one each) are new
    weights = {name: ql.measure.weights_bytes(transformer) for name, transformer in transformers.items()}
    qkv, mlp = block.attn.to_qkv, block.proj_mlp
    new_bytes = len(transformer.single_transformer_blocks) * (qkv.out_features + mlp.out_features) * (2 + 4)
    assert weights[SINGLE_BLOCK_KERNELS] == weights[SINGLE_BLOCK_KERNELS.replace("+single-block-kernels", "")]
    assert weights[SINGLE_BLOCK_KERNELS + "+fused-qkv-mlp"] == weights[SINGLE_BLOCK_KERNELS] + new_bytes


def _with_single_block_kernels(transformer, seeds=(1, 2)):
    """`transformer` (a copy of the tiny one) with SINGLE_BLOCK_KERNELS, calibrated on random inputs of `seeds`."""
    calibration = [ql.measure.random_transformer_inputs(transformer.config, 128, 128, 32, seed=seed) for seed in seeds]
    with torch.no_grad():
        speed.apply_speed_recipe(transformer, SINGLE_BLOCK_KERNELS, H100,
                                 calibrate=lambda: [transformer(**c) for c in calibration])
    return transformer


def test_one_matmul_runs_both_input_projections_of_a_single_block_with_their_own_scales(tiny_pipe,
                                                                                        twins_of_the_kernels):
    transformer = _with_single_block_kernels(copy.deepcopy(tiny_pipe.transformer))
    block = transformer.single_transformer_blocks[0]
    qkv, mlp = block.attn.to_qkv, block.proj_mlp
    assert torch.equal(qkv.fp8_input_scale, mlp.fp8_input_scale)  # both observed the same normalized tokens
    x = (torch.randn(2, 5, qkv.in_features, generator=torch.Generator().manual_seed(0)) * 50).to(torch.float8_e4m3fn)
    separate = [speed.static_fp8_linear(x, linear, torch.bfloat16) for linear in (qkv, mlp)]
    before = [linear.weight.qdata.clone() for linear in (qkv, mlp)]
    tokens = torch.randn(2, 5, qkv.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torchao_before = [linear(tokens) for linear in (qkv, mlp)]  # torchao's own path: quantize, then matmul
    assert speed.fuse_single_block_projections(transformer) == len(transformer.single_transformer_blocks)
    joined = block.fp8_qkv_mlp_weight_t
    assert joined.shape == (qkv.in_features, qkv.out_features + mlp.out_features)
    assert qkv.weight.qdata.data_ptr() == joined.data_ptr()  # the torchao weights view the joined one
    assert mlp.weight.qdata.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
    assert mlp.fp8_weight_t.data_ptr() == mlp.weight.qdata.data_ptr()
    assert all(torch.equal(b.view(torch.uint8), linear.weight.qdata.view(torch.uint8))
               for b, linear in zip(before, (qkv, mlp)))
    assert block.fp8_qkv_mlp_weight_scale.shape == (1, qkv.out_features + mlp.out_features)
    assert block.fp8_qkv_mlp_weight_scale[0, 0] == qkv.weight.scale.item()
    assert block.fp8_qkv_mlp_weight_scale[0, -1] == mlp.weight.scale.item() != qkv.weight.scale.item()
    both = speed.joined_qkv_mlp_linear(x, block, torch.bfloat16)
    assert [tuple(out.shape) for out in both] == [(2, 5, qkv.out_features), (2, 5, mlp.out_features)]
    assert all(torch.equal(a, b) for a, b in zip(both, separate))
    assert all(torch.equal(linear(tokens), out) for linear, out in zip((qkv, mlp), torchao_before))  # on the views


def test_one_matmul_for_both_projections_needs_the_kernels_and_one_input_scale(tiny_pipe, twins_of_the_kernels):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    with pytest.raises(ValueError, match="Single-stream block 0 runs diffusers' own forward.*call "
                                         "use_single_block_kernels\\(transformer\\) first"):
        speed.fuse_single_block_projections(transformer)
    _with_single_block_kernels(transformer, seeds=(1,))
    last_index = len(transformer.single_transformer_blocks) - 1
    last = transformer.single_transformer_blocks[last_index].proj_mlp
    last.fp8_input_scale = last.fp8_input_scale * 2
    with pytest.raises(ValueError, match=f"different input scales for them in single-stream block {last_index} .*"
                                         "Instead: calibrate both on the same inputs"):
        speed.fuse_single_block_projections(transformer)
    assert not any(hasattr(block, "fp8_qkv_mlp_weight_t") for block in transformer.single_transformer_blocks)


def test_a_single_block_kernels_recipe_refuses_a_transformer_not_in_bf16_before_changing_it(tiny_pipe, fa3_installed,
                                                                                             triton_installed):
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    with pytest.raises(ValueError, match="single-block-kernels round as PyTorch does on bf16 activations, and this "
                                         "transformer is torch.float32. Instead: load it in bf16"):
        speed.apply_speed_recipe(transformer, SINGLE_BLOCK_KERNELS, H100, calibrate=lambda: None)
    assert not transformer.transformer_blocks[0].attn.fused_projections


def test_the_single_block_kernels_need_the_rope_processor_and_static_fp8(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    with pytest.raises(ValueError, match="round as PyTorch does on bf16 activations, and this transformer is "
                                         "torch.float32"):
        speed.use_single_block_kernels(copy.deepcopy(transformer).float())
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        speed.use_single_block_kernels(transformer)
    assert "forward" not in transformer.single_transformer_blocks[0].__dict__  # refused before any block changed
    transformer.fuse_qkv_projections()
    transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=True, rope_kernel=True))
    with pytest.raises(ValueError, match="weight is a Parameter. Instead: quantize with float8static-tensor"):
        speed.use_single_block_kernels(transformer)
    with pytest.raises(ValueError, match="LoRA scale"):
        speed._single_block_with_kernels(transformer.single_transformer_blocks[0], None, torch.zeros(1, 1, 1), None,
                                         joint_attention_kwargs={"scale": 0.5})


def test_the_single_block_kernels_check_their_arguments_then_say_what_they_need_where_they_cannot_run():
    text, image, modulation = (torch.zeros(*shape, dtype=torch.bfloat16) for shape in ((1, 2, 64), (1, 3, 64), (1, 64)))
    scale = torch.ones(1)
    with pytest.raises(ValueError, match="rounds where PyTorch does on bfloat16 activations, and these are "
                                         "torch.float32. Instead: layer_norm_modulate_reference"):
        ql.kernels.layer_norm_modulate_fp8(text.float(), image.float(), modulation, modulation, (scale,))
    with pytest.raises(ValueError, match="one or two static input scales, one number each"):
        ql.kernels.layer_norm_modulate_fp8(text, image, modulation, modulation, (scale,) * 3)
    with pytest.raises(ValueError, match=r"one number each.*\[\(2,\)\]"):
        ql.kernels.gelu_cat_fp8(image, torch.zeros(1, 3, 256), torch.ones(2))
    with pytest.raises(ValueError, match="must share the batch and the last dimension"):
        ql.kernels.layer_norm_modulate_fp8(text, image[..., :32], modulation, modulation, (scale,))
    with pytest.raises(ValueError, match="must have the same tokens"):
        ql.kernels.gelu_cat_fp8(text, torch.zeros(1, 3, 256), scale)
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: layer_norm_modulate_reference"):
        ql.kernels.layer_norm_modulate_fp8(text, image, modulation, modulation, (scale,))
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: gelu_cat_reference"):
        ql.kernels.gelu_cat_fp8(image, torch.zeros(1, 3, 256), scale)


@pytest.mark.skipif(ql.kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
@pytest.mark.parametrize("scales", [1, 2])
def test_the_single_block_kernels_match_their_references_on_a_gpu(scales):
    generator = torch.Generator("cpu").manual_seed(0)
    dim, mlp_dim, text_tokens, image_tokens = 192, 768, 7, 45  # a dim that is no power of two, as FLUX's 3072
    randn = lambda *shape, s=1.0: (torch.randn(*shape, generator=generator) * s).to("cuda", torch.bfloat16)  # noqa
    text, image = randn(2, text_tokens, dim), randn(2, image_tokens, dim, s=4.0) + 1
    shift, scale, _ = randn(2, 3 * dim, s=0.5).chunk(3, dim=1)  # views into one tensor, as diffusers' chunk gives
    input_scales = tuple(torch.tensor([[s]], device="cuda") for s in (0.01, 0.004)[:scales])
    with torch.no_grad():
        outputs = ql.kernels.layer_norm_modulate_fp8(text, image, shift, scale, input_scales)
        references = ql.kernels.layer_norm_modulate_reference(text, image, shift, scale, input_scales)
    assert len(outputs) == 1 + scales and torch.equal(outputs[0], references[0])  # the joined tokens, copied
    for output, reference in zip(outputs[1:], references[1:]):
        assert output.shape == (2, text_tokens + image_tokens, dim) and output.dtype == torch.float8_e4m3fn
        _differ_by_one_fp8_step_at_most(output, reference)
    projection = randn(2, text_tokens + image_tokens, 3 * dim + mlp_dim, s=3.0)  # the MLP part: a strided view
    attention, mlp = randn(2, text_tokens + image_tokens, dim), projection[..., 3 * dim:]
    with torch.no_grad():
        output = ql.kernels.gelu_cat_fp8(attention, mlp, input_scales[0])
        reference = ql.kernels.gelu_cat_reference(attention, mlp, input_scales[0])
    assert output.shape == (2, text_tokens + image_tokens, dim + mlp_dim)
    assert torch.equal(output[..., :dim].float(), reference[..., :dim].float())  # the attention part: a plain cast
    _differ_by_one_fp8_step_at_most(output, reference)


@pytest.mark.skipif(ql.kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
def test_the_single_block_kernels_compile_in_one_graph_to_what_they_give_eagerly():
    text, image = (torch.randn(1, n, 256, device="cuda", dtype=torch.bfloat16) for n in (3, 20))
    shift, scale = torch.zeros(2, 1, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    input_scales = (torch.tensor([[0.01]], device="cuda"),)
    mlp = torch.randn(1, 23, 1024, device="cuda", dtype=torch.bfloat16)

    def block_end(text, image, shift, scale):
        joined, quantized = ql.kernels.layer_norm_modulate_fp8(text, image, shift, scale, input_scales)
        return joined, quantized, ql.kernels.gelu_cat_fp8(joined, mlp, input_scales[0])

    compiled = torch.compile(block_end, fullgraph=True)
    for eager, traced in zip(block_end(text, image, shift, scale), compiled(text, image, shift, scale)):
        assert torch.equal(eager.view(torch.uint8), traced.view(torch.uint8))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="fp8 matmuls: need a CUDA GPU of compute capability 8.9+")
def test_one_matmul_for_both_projections_is_as_accurate_as_two_on_a_gpu():
    """On a GPU the two paths may run different kernels (row-wise and per-tensor scaling): not bit for bit."""
    from torchao.quantization import quantize_

    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    block.attn.to_qkv, block.proj_mlp = (torch.nn.Linear(512, n, device="cuda", dtype=torch.bfloat16)
                                         for n in (1536, 2048))
    with torch.no_grad():
        block.proj_mlp.weight.mul_(3)  # a weight scale of its own
        tokens = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16)
        quantize_(block, speed._quantization_config("float8static-tensor", step="prepare"))  # new modules
        block.attn.to_qkv(tokens), block.proj_mlp(tokens)
        quantize_(block, speed._quantization_config("float8static-tensor", step="convert"),
                  filter_fn=lambda module, name: hasattr(module, "input_act_obs"))
        linears = (block.attn.to_qkv, block.proj_mlp)
        for linear in linears:
            speed._keep_fp8_operands(linear)
        input_scale = linears[0].fp8_input_scale
        x = (tokens.float() / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        separate = [speed.static_fp8_linear(x, linear, torch.bfloat16) for linear in linears]
        speed.join_qkv_mlp_weights(block)
        both = speed.joined_qkv_mlp_linear(x, block, torch.bfloat16)
    for one, two, linear in zip(both, separate, linears):  # against the same fp8 operands in float64
        weight = linear.weight.qdata.double() * linear.fp8_weight_scale.double()
        exact = (x.double() * input_scale.double()) @ weight.T + linear.bias.double()
        assert ql.measure.sqnr_db(one, exact) > ql.measure.sqnr_db(two, exact) - 1 > 40
        assert ql.measure.sqnr_db(one, two) > 40


def test_static_fp8_observes_then_quantizes_every_linear_that_runs(tiny_pipe):
    import torch._inductor.config as inductor_config

    transformer = copy.deepcopy(tiny_pipe.transformer)
    config = transformer.config
    inputs = ql.measure.random_transformer_inputs(config, 128, 128, 32)
    calibration = [ql.measure.random_transformer_inputs(config, 128, 128, 32, seed=seed) for seed in (1, 2)]
    with torch.no_grad():
        reference = transformer(**inputs)[0]
    name = "float8static-tensor+fused-qkv"
    with pytest.raises(ValueError, match="pass calibrate="):  # a bare transformer has no prompt to calibrate on
        speed.apply_speed_recipe(transformer, name, H100)
    assert not transformer.transformer_blocks[0].attn.fused_projections  # refused before anything changed
    with inductor_config.patch(coordinate_descent_tuning=False):
        # H100 described: torchao's static fp8 runs on a CPU too (slowly), which the hardware check would refuse
        speed.apply_speed_recipe(transformer, name, H100, calibrate=lambda: [transformer(**c) for c in calibration])
        assert inductor_config.coordinate_descent_tuning  # set by torchao's convert step, as by its dynamic config
    attention = transformer.transformer_blocks[0].attn
    weight = attention.to_qkv.weight
    assert type(weight).__name__ == "PrototypeFloat8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    assert weight.act_quant_scale.numel() == 1 and weight.act_quant_scale.item() > 0  # one scale for the tensor
    assert type(attention.to_q.weight) is torch.nn.Parameter  # kept beside the fused one, never run: not observed
    assert not any("Observed" in type(m).__name__ for m in transformer.modules())
    with torch.no_grad():
        output = transformer(**inputs)[0]
    assert 15 < ql.measure.sqnr_db(output, reference) < 35


def test_gelu_as_a_sigmoid_is_the_tanh_gelu():
    x = torch.linspace(-12, 12, 200_001)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert (speed.gelu_tanh_via_sigmoid(x).double() - exact).abs().max() < 2e-6
    assert (speed.gelu_tanh_via_sigmoid(x.double()) - exact).abs().max() < 1e-12  # float64 stays float64
    half = x.bfloat16()  # computed in float32, rounded once: at most one bf16 step from F.gelu's own rounding
    step = torch.nn.functional.gelu(half, approximate="tanh").float().abs().clamp(min=1e-3) * 2**-7
    assert ((speed.gelu_tanh_via_sigmoid(half).float() - torch.nn.functional.gelu(half, approximate="tanh").float())
            .abs() <= step).all()
    with pytest.raises(ValueError, match="Add a compile step"):
        speed.parse_speed_recipe("bf16+gelu-sigmoid")
    assert speed.parse_speed_recipe("bf16+gelu-sigmoid+compile-regional").gelu_sigmoid


def test_gelu_sigmoid_changes_every_tanh_gelu_and_not_the_output(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    inputs = ql.measure.random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
    with torch.no_grad():
        reference = transformer(**inputs)[0]
        changed = speed.use_sigmoid_gelu(transformer)
        output = transformer(**inputs)[0]
    # one in each single-stream block; two in each double-stream block, the image's and the text's feed-forward
    assert changed == len(transformer.single_transformer_blocks) + 2 * len(transformer.transformer_blocks)
    assert isinstance(transformer.single_transformer_blocks[0].act_mlp, speed.SigmoidGELU)
    assert transformer.transformer_blocks[0].ff.net[0].gelu is speed.gelu_tanh_via_sigmoid
    assert not any(isinstance(m, torch.nn.GELU) for m in transformer.modules())
    assert speed.use_sigmoid_gelu(transformer) == 0  # nothing left to rewrite
    assert ql.measure.sqnr_db(output, reference) > 100  # float32 rounding apart
    pipe = copy.deepcopy(tiny_pipe)  # the recipe step: rewritten, then compiled (lazily: nothing runs here)
    speed.apply_speed_recipe(pipe, "bf16+gelu-sigmoid+compile-regional", CPU)
    block = pipe.transformer.single_transformer_blocks[0]
    assert isinstance(block.act_mlp, speed.SigmoidGELU) and block._compiled_call_impl is not None


def test_the_matmuls_of_a_step_are_timed_shape_by_shape():
    row = speed.run_matmuls("matmuls-bf16", "tiny", height=64, width=64, text_tokens=8, calls=1, warmup=0,
                            repeats=1, device="cpu")
    transformer = ql.models.meta_component("tiny", "transformer")
    transformer.fuse_qkv_projections()
    flops = speed.transformer_tflop_per_step(transformer, 64, 64, 8)
    shapes = row.extra["shapes"]
    assert row.extra["linear_tflop"] == pytest.approx(flops["linear_tflop"])
    assert sum(2 * s["rows"] * s["in_features"] * s["out_features"] * s["count"] for s in shapes) / 1e12 == (
        pytest.approx(flops["linear_tflop"]))  # the shapes timed are the step's Linears
    unused = speed._unused_projections(transformer)  # the unfused q, k, v kept beside the fused ones
    assert sum(s["count"] for s in shapes) == sum(
        isinstance(m, torch.nn.Linear) and name not in unused for name, m in transformer.named_modules())
    assert row.ms_per_step == pytest.approx(sum(s["ms"] * s["count"] for s in shapes))
    # the modulation, the text stream, the image stream (4x4 patches) and the joined sequence of the single blocks
    assert {s["rows"] for s in shapes} == {1, 8, 16, 16 + 8}
    with pytest.raises(ql.UnsupportedHardwareError, match="matmuls-fp8 times float8 matmuls"):
        speed.run_matmuls("matmuls-fp8", "tiny", device="cpu")
    with pytest.raises(ValueError, match="matmuls-bf16 or matmuls-fp8"):
        speed.run_matmuls("matmuls-int4", "tiny", device="cpu")


def test_a_steps_matmuls_and_attention_are_recorded_with_their_operands(tiny_pipe, twins_of_the_kernels):
    transformer = _with_single_block_kernels(copy.deepcopy(tiny_pipe.transformer))
    speed.fuse_single_block_projections(transformer)
    inputs = ql.measure.random_transformer_inputs(transformer.config, 128, 128, 32)
    with torch.no_grad():
        output = transformer(**inputs)[0]
        calls = speed.record_compute_calls(lambda: transformer(**inputs))
        replayed = speed.replay_compute_calls(calls)
    flops = speed.transformer_tflop_per_step(transformer, 128, 128, 32)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    attention = [c for c in calls if c.kind == "attention"]
    assert len(attention) == blocks  # the tests' stand-in for FA3 is PyTorch's CPU kernel
    assert sum(c.tflop for c in attention) == pytest.approx(flops["attention_tflop"])
    # every Linear that runs, once, as torch._scaled_mm (static fp8 quantizes them all), and each single-stream
    # block's to_qkv and proj_mlp as one
    assert sum(c.tflop for c in calls if c.kind == "matmul") == pytest.approx(flops["linear_tflop"])
    assert {c.op.overloadpacket.__name__ for c in calls if c.kind == "matmul"} == {"_scaled_mm"}
    unused = speed._unused_projections(transformer)
    linears = sum(isinstance(m, torch.nn.Linear) and name not in unused for name, m in transformer.named_modules())
    assert len(calls) - len(attention) == linears - len(transformer.single_transformer_blocks)
    # the operands are the step's own: the last call, replayed, gives the transformer's output
    assert calls[-1].kind == "matmul" and torch.equal(replayed[-1].view_as(output), output)


def test_the_compute_only_step_times_the_recorded_calls_of_the_eager_recipe():
    row = speed.run_compute_only("compute-only:bf16+fused-qkv+compile-regional", "tiny", height=64,
                                 width=64, text_tokens=8, warmup=0, repeats=2, device="cpu")
    transformer = ql.models.meta_component("tiny", "transformer")
    transformer.fuse_qkv_projections()
    flops = speed.transformer_tflop_per_step(transformer, 64, 64, 8)
    extra = row.extra
    assert extra["recorded_from"] == "bf16+fused-qkv"  # compiling only changes how the kernels launch
    assert extra["recorded_tflop"]["matmul"] == pytest.approx(flops["linear_tflop"])
    assert extra["recorded_tflop"]["attention"] == pytest.approx(flops["attention_tflop"])
    config = transformer.config
    assert extra["calls_by_kind"]["attention"] == config.num_layers + config.num_single_layers
    assert extra["achieved_tflops"] == pytest.approx(flops["total_tflop"] / row.ms_per_step * 1e3)
    assert row.recipe == "compute-only:bf16+fused-qkv+compile-regional" and row.ms_per_step > 0
    with pytest.raises(ValueError, match="compute-only:<recipe>"):
        speed.run_compute_only("bf16+fused-qkv", "tiny", device="cpu")
    with pytest.raises(ql.UnsupportedHardwareError, match="Hopper"):
        speed.run_compute_only("compute-only:bf16+attn-fa3", "tiny", device="cpu")


def test_attention_alone_is_timed_at_flux_dev_shape_and_checked_against_float32():
    row = speed.run_attention("attention-native", tokens=256, heads=2, head_dim=64, blocks=57, calls=2, warmup=1,
                              repeats=2, device="cpu")
    extra = row.extra
    assert extra["tflop_per_call"] == pytest.approx(4 * 256**2 * 2 * 64 / 1e12)
    assert row.ms_per_step == pytest.approx(57 * extra["attention_ms"])
    assert extra["tflops"] == pytest.approx(extra["tflop_per_call"] / extra["attention_ms"] * 1e3)
    assert 40 < extra["sqnr_db"] < 70  # bf16 inputs and output against float32 arithmetic
    with pytest.raises(ValueError, match="attention-{native,.*,fa3,fa3-fp8}"):
        speed.run_attention("attention-sage", device="cpu")
    with pytest.raises(ql.UnsupportedHardwareError, match="Hopper"):
        speed.run_attention("attention-fa3-fp8", device="cpu")


def test_a_recipe_this_device_cannot_run_changes_nothing(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    with pytest.raises(ql.UnsupportedHardwareError, match="float8"):
        speed.make_fast(pipe, "float8dq-tensor+fused-qkv+compile-regional", device=CPU)
    attention = pipe.transformer.transformer_blocks[0].attn
    assert not attention.fused_projections and hasattr(attention, "to_q")
    assert type(attention.to_q.weight) is torch.nn.Parameter


def test_make_fast_fuses_quantizes_and_compiles_the_transformer(tiny_pipe, tiny_path):
    pipe = copy.deepcopy(tiny_pipe)
    inputs = ql.measure.random_transformer_inputs(pipe.transformer.config, 128, 128, 32)
    with torch.no_grad():
        reference = pipe.transformer(**inputs)[0]
    speed.make_fast(pipe, "int8dq+fused-qkv+attn-math+compile-regional", device=CPU)
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.fused_projections and block.attn.to_qkv.out_features == 3 * block.attn.to_q.out_features
    assert type(block.attn.to_qkv.weight).__name__ != "Parameter"  # torchao's int8 tensor
    assert block._compiled_call_impl is not None and pipe.transformer._compiled_call_impl is None
    # the int8 matmuls are checked eagerly here (compiling costs a minute on a CPU; the chapter does it)
    pipe.transformer.transformer_blocks.apply(lambda m: setattr(m, "_compiled_call_impl", None))
    pipe.transformer.single_transformer_blocks.apply(lambda m: setattr(m, "_compiled_call_impl", None))
    with torch.no_grad():
        output = pipe.transformer(**inputs)[0]
    assert 20 < ql.measure.sqnr_db(output, reference) < 60


def test_fused_qkv_alone_leaves_the_output_unchanged(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    inputs = ql.measure.random_transformer_inputs(pipe.transformer.config, 128, 128, 32)
    with torch.no_grad():
        reference = pipe.transformer(**inputs)[0]
        speed.apply_speed_recipe(pipe, "bf16+fused-qkv", CPU)
        output = pipe.transformer(**inputs)[0]
    assert ql.measure.sqnr_db(output, reference) > 40


def test_the_runner_times_a_recipe_and_compares_it_with_bf16(tmp_path):
    reference = tmp_path / "bf16.pt"
    bf16 = speed.run_speed_recipe("bf16", "tiny", height=128, width=128, text_tokens=32, warmup=1, repeats=2,
                                  reference=str(reference))
    assert reference.exists() and bf16.extra["sqnr_db"] == float("inf")
    row = speed.run_speed_recipe("bf16+attn-math", "tiny", height=128, width=128, text_tokens=32, warmup=1,
                                 repeats=2, reference=str(reference))
    assert row.ms_per_step > 0 and row.repeats == 2 and row.extra["compile_s"] is None
    assert 30 < row.extra["sqnr_db"] < float("inf")  # another attention kernel: not identical, but close
    assert row.extra["total_tflop"] == pytest.approx(bf16.extra["total_tflop"])
    # set_attention_backend() changed the process-wide default; the runner put it back
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    assert _AttentionBackendRegistry.get_active_backend()[0] == "native"


def test_the_pipeline_runner_times_a_recipe_in_a_whole_pipeline():
    row = speed.run_speed_pipeline("bf16+fused-qkv", "tiny", height=64, width=64, steps=3, repeats=2, device="cpu")
    assert (row.recipe, row.steps, row.repeats, row.height) == ("bf16+fused-qkv", 3, 2, 64)
    assert row.s_per_image > row.ms_per_step / 1e3 > 0 and row.extra["first_image_s"] > 0
    assert row.extra["compile_s"] is None and "whole pipeline" in row.notes
    with pytest.raises(ql.UnsupportedHardwareError, match="CUDA graph"):
        speed.run_speed_pipeline("bf16+compile-regional+cuda-graph", "tiny", device="cpu")


def test_vae_variants_are_named():
    with pytest.raises(ValueError, match="vae-decode"):
        speed.run_vae_decode("vae-decode+fp8", "tiny")


def test_kernel_kinds_name_gpu_kernels_and_cpu_operators():
    assert speed.kernel_kind("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert speed.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert speed.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert speed.kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert speed.kernel_kind("triton_poi_fused__to_copy_add_mul_0") == "fused by inductor"
    # named after what it feeds, but it is elementwise work: the activations' fp8 scaling, or RMSNorm and RoPE
    assert speed.kernel_kind("triton_poi_fused__scaled_mm__to_copy_clamp_div_gelu_t_view_27") == "fused by inductor"
    assert speed.kernel_kind("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_") == \
        "fused by inductor"
    assert speed.kernel_kind("triton_tem_fused_addmm_0") == "matmul"
    assert speed.kernel_kind("_qk_norm_rope_fp8_kernel") == "rope kernel"
    assert {speed.kernel_kind(f"_{name}_fp8_kernel") for name in ("layer_norm_modulate", "gelu_cat")} == {
        "single-block kernels"}
    assert speed.kernel_kind("aten::addmm") == "matmul" and speed.kernel_kind("aten::copy_") == "other"


def test_profile_step_says_where_the_time_goes():
    linear, q = torch.nn.Linear(256, 256), torch.randn(1, 4, 256, 64)

    def step():
        with torch.no_grad():
            linear(torch.randn(2048, 256))
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    profile = speed.profile_step(step, steps=2, device="cpu", top=5)
    by_kind = profile["ms_per_step_by_kind"]
    assert {"matmul", "attention"} <= set(by_kind) and all(ms > 0 for ms in by_kind.values())
    assert profile["profiled_ms_per_step"] == pytest.approx(sum(by_kind.values()))
    assert len(profile["top_kernels"]) <= 5 and {k["kind"] for k in profile["top_kernels"]} >= {"matmul", "attention"}
