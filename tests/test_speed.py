"""Chapter 06's speed-ups (quantlab.speed): the rules of `Speedups`, the hardware checks of the speed recipes,
`apply_speedups` on the tiny model, the CUDA graph, the FLOP floor, amortization and the committed rows.

The lab's hand-written steps, kernels and runners are tested in test_lab_speed.py.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import quantlab as ql
from quantlab import env, speed
from quantlab.env import DeviceInfo
from quantlab.lab.runner import random_transformer_inputs
from quantlab.recipes import Speedups

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), bf16=True, fp8=True)
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5), bf16=False, fp8=False)
CPU = DeviceInfo("cpu", "CPU (x86_64, 2 cores)")
L40S = DeviceInfo("cuda", "NVIDIA L40S", (8, 9), bf16=True, fp8=True)
FASTEST_ON_HOPPER = ("float8static-tensor+fused-qkv+attn-fa3-fp8+gelu-sigmoid+rope-kernel+single-block-kernels"
                     "+compile-regional+cuda-graph")  # H200
FASTEST_WITHOUT_FA3 = "float8dq-row+fused-qkv+attn-cudnn+compile-regional+cuda-graph"
# the rope kernel's step, eager and without the GELU rewrite: no registered recipe has exactly these steps
ROPE_KERNEL = Speedups(activations="float8static-tensor", fuse_qkv=True, attention="fa3-fp8", rope_kernel=True,
                       compile="regional", cuda_graph=True)
SINGLE_BLOCK_KERNELS = Speedups(activations="float8static-tensor", fuse_qkv=True, attention="fa3-fp8",
                                rope_kernel=True, single_block_kernels=True)

pytestmark = pytest.mark.usefixtures("keep_the_default_attention_backend")


def check(steps: Speedups | str, device: DeviceInfo, packages: bool = True) -> None:
    """The one hardware check, for a registered recipe's name or for steps built here."""
    if isinstance(steps, str):
        ql.get_recipe(steps).check(device, packages=packages)
    else:
        env.check_hardware("these speed-ups", steps.needs(), device, packages=packages)


# --- Speedups: which steps go together, and the names they make -----------------------------------


def test_a_recipe_is_named_after_its_steps():
    steps = Speedups(activations="float8dq-tensor", fuse_qkv=True, attention="cudnn", compile="regional",
                     compile_mode="max-autotune")
    assert (steps.activations, steps.fuse_qkv, steps.attention) == ("float8dq-tensor", True, "cudnn")
    assert (steps.compile_mode, steps.compiled_region, steps.fp8) == ("max-autotune", "repeated blocks", True)
    assert steps.suffix() == "+fused-qkv+attn-cudnn+compile-regional-max-autotune"
    whole = Speedups(activations="int8dq", compile="whole", vae_channels_last=True)
    assert (whole.compile_mode, whole.compiled_region, whole.fp8, whole.vae_channels_last) == (
        "default", "whole transformer", False, True)
    assert whole.suffix() == "+compile+vae-channels-last"
    assert ql.get_recipe("bf16").speedups == Speedups() and not Speedups().any and Speedups().suffix() == ""
    registered = ql.get_recipe("float8dq-tensor+fused-qkv+attn-cudnn+compile-regional")
    assert registered.speedups == dataclasses.replace(steps, compile_mode="default")
    # every registered speed recipe is its weights' recipe followed by its steps, in the order they are applied
    for name, recipe in ql.recipes.RECIPES.items():
        if recipe.speedups.any and recipe.backend == "none":
            assert name.endswith(recipe.speedups.suffix()), name


def test_a_cuda_graph_replays_regional_blocks_or_an_eager_forward_pass():
    steps = ql.get_recipe("float8dq-row+fused-qkv+attn-cudnn+compile-regional+cuda-graph").speedups
    assert steps.cuda_graph and steps.compile == "regional" and steps.fp8
    assert Speedups(cuda_graph=True).cuda_graph
    # a whole-model compile replaces the forward pass that the graph would record
    with pytest.raises(ValueError, match="compile-reduce-overhead"):
        Speedups(compile="whole", cuda_graph=True)
    with pytest.raises(ql.UnsupportedHardwareError, match="CUDA graph records CUDA kernels"):
        check(Speedups(compile="regional", cuda_graph=True), CPU)
    check(Speedups(compile="regional", cuda_graph=True), T4)
    with pytest.raises(ql.UnsupportedHardwareError, match="CUDA graph records CUDA kernels"):
        check("bf16+fused-qkv+attn-cudnn+compile-regional+cuda-graph", CPU)


def test_inductor_flags_need_a_compile_step():
    # that they are set, and that the lab's runner puts them back: test_lab_speed.py
    with pytest.raises(ValueError, match="add a compile step"):
        Speedups(inductor_flags=True)
    assert Speedups(inductor_flags=True, compile="regional").inductor_flags
    assert ql.get_recipe("float8dq-row+fused-qkv+attn-cudnn+compile-regional+inductor-flags+cuda-graph"
                         ).speedups.inductor_flags


@pytest.mark.parametrize("make, words", [
    (lambda: ql.get_recipe("fp16"), "Unknown recipe 'fp16'"),
    (lambda: ql.get_recipe("bf16+compile-regional+fused-qkv"), "Unknown recipe"),  # names are looked up, not parsed
    (lambda: Speedups(activations="fp16"), "Unknown activations 'fp16'. Valid: float8dq-row, "),
    (lambda: Speedups(compile="regional", compile_mode="fast"), "Unknown compile mode 'fast'"),
    (lambda: Speedups(compile="partial"), "Unknown compile 'partial'"),
    (lambda: Speedups(attention="sage"), "Unknown attention 'sage'. Valid: native, .*, fa3, fa3-fp8"),
])
def test_a_bad_recipe_or_step_says_what_is_valid(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_hardware_checks_come_first():
    check(FASTEST_WITHOUT_FA3, H100)
    with pytest.raises(ql.UnsupportedHardwareError, match="compute capability 8.9"):
        check("float8dq-row+fused-qkv+compile", T4)
    with pytest.raises(ql.UnsupportedHardwareError, match="compute capability 8.9"):
        check(Speedups(activations="float8dq-row", compile="whole"), T4)
    with pytest.raises(ql.UnsupportedHardwareError, match="attn-native"):
        check("bf16+attn-cudnn", CPU)
    with pytest.raises(ql.UnsupportedHardwareError, match="8.0"):
        check("bf16+attn-flash", T4)
    check("bf16+attn-efficient", T4)
    check(Speedups(activations="int8dq", fuse_qkv=True, attention="math", compile="regional"), CPU)
    check("int8dq+compile-regional", CPU)


def test_fa3_needs_hopper_and_its_package(fa3_installed, triton_installed):
    steps = ql.get_recipe(FASTEST_ON_HOPPER).speedups
    assert (steps.activations, steps.attention, steps.fp8, steps.hand_written) == (
        "float8static-tensor", "fa3-fp8", True, True)
    assert Speedups(attention="fa3").attention == "fa3" and Speedups(attention="fa3").hand_written
    check(FASTEST_ON_HOPPER, H100)
    for device in (L40S, T4, CPU):
        with pytest.raises(ql.UnsupportedHardwareError, match="Hopper GPUs .compute capability 9.0.*attn-cudnn"):
            check(Speedups(attention="fa3"), device)
    fa3_installed["fa3_fwd_interface"] = "not installed here"
    with pytest.raises(ql.UnsupportedHardwareError, match=r"which is not installed here.*pip install fa3-fwd==0\.0\.3"):
        check(Speedups(attention="fa3-fp8"), H100)
    check(Speedups(attention="fa3-fp8"), H100, packages=False)
    with pytest.raises(ql.UnsupportedHardwareError, match=r"which is not installed here.*pip install fa3-fwd==0\.0\.3"):
        check(FASTEST_ON_HOPPER, H100)
    check(FASTEST_ON_HOPPER, H100, packages=False)  # the hardware alone would run it


def test_without_fa3_the_fastest_recipe_without_it_still_runs(fa3_missing):
    check(FASTEST_WITHOUT_FA3, H100)
    check(FASTEST_WITHOUT_FA3, L40S)  # fp8, but FA3 is for Hopper only


def test_fa3_that_is_missing_or_does_not_load_is_named(monkeypatch):
    import importlib
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    assert env._module_problem("fa3_fwd_interface") == "not installed here"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())

    def no_cuda_13(name, *args):
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", no_cuda_13)
    assert env._module_problem("fa3_fwd_interface").startswith(
        "installed here but does not load (OSError: libcudart.so.13")


def test_the_rope_kernel_step_needs_fused_qkv_fp8_fa3_and_triton(fa3_installed):
    assert ROPE_KERNEL.rope_kernel and ROPE_KERNEL.hand_written
    for without in (dict(fuse_qkv=False), dict(attention="fa3")):
        with pytest.raises(ValueError, match="add fused-qkv and attn-fa3-fp8"):
            dataclasses.replace(ROPE_KERNEL, **without)
    fa3_installed["triton"] = "not installed here"
    with pytest.raises(ql.UnsupportedHardwareError, match=r"needs Triton \(rope-kernel\), which is not installed "
                                                          r"here\. Install it with `pip install triton`, or instead: "
                                                          r"leave out rope-kernel"):
        check(ROPE_KERNEL, H100)
    check(ROPE_KERNEL, H100, packages=False)  # the hardware alone would run it
    del fa3_installed["triton"]
    check(ROPE_KERNEL, H100)
    registered = "float8static-tensor+fused-qkv+attn-fa3-fp8+gelu-sigmoid+rope-kernel+compile-regional+cuda-graph"
    assert ql.get_recipe(registered).speedups == dataclasses.replace(ROPE_KERNEL, gelu_sigmoid=True)
    # where a GPU cannot compile fp8 in Triton: the need says so, and what to leave out
    triton = [need for need in ROPE_KERNEL.needs() if need.what.startswith("Triton")]
    with pytest.raises(ql.UnsupportedHardwareError, match=r"compute capability 8\.9\+ \(rope-kernel runs Triton "
                                                          r"kernels for CUDA GPUs.*leave out rope-kernel"):
        env.check_hardware("rope", triton, T4)


def test_the_single_block_kernels_step_needs_static_fp8_the_rope_kernel_and_triton(fa3_installed):
    assert SINGLE_BLOCK_KERNELS.single_block_kernels
    for without in (dict(activations="float8dq-tensor"),  # no scales in advance
                    dict(rope_kernel=False)):
        with pytest.raises(ValueError, match="start with float8static-tensor, and add fused-qkv, attn-fa3-fp8 and "
                                             "rope-kernel"):
            dataclasses.replace(SINGLE_BLOCK_KERNELS, **without)
    assert dataclasses.replace(SINGLE_BLOCK_KERNELS, fused_qkv_mlp=True).fused_qkv_mlp
    with pytest.raises(ValueError, match="fused-qkv-mlp joins two Linears that only the single-block kernels' "
                                         "forward calls as one matmul.*add single-block-kernels"):
        dataclasses.replace(SINGLE_BLOCK_KERNELS, single_block_kernels=False, fused_qkv_mlp=True)
    fa3_installed["triton"] = "not installed here"
    with pytest.raises(ql.UnsupportedHardwareError, match=r"needs Triton \(rope-kernel and single-block-kernels\), "
                                                          "which is not installed here"):
        check(SINGLE_BLOCK_KERNELS, H100)
    triton = [need for need in SINGLE_BLOCK_KERNELS.needs() if need.what.startswith("Triton")]
    with pytest.raises(ql.UnsupportedHardwareError, match="rope-kernel and single-block-kernels run Triton kernels "
                                                          "for CUDA GPUs.*this device is CPU"):
        env.check_hardware("kernels", triton, CPU)


# --- apply_speedups on the tiny model -----------------------------------------------------------


def test_a_recipe_this_device_cannot_run_changes_nothing(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    with pytest.raises(ql.UnsupportedHardwareError, match="float8"):
        speed.apply_speedups(pipe, ql.get_recipe("float8dq-tensor+fused-qkv+attn-cudnn+compile-regional"),
                             device=CPU)
    attention = pipe.transformer.transformer_blocks[0].attn
    assert not attention.fused_projections and hasattr(attention, "to_q")
    assert type(attention.to_q.weight) is torch.nn.Parameter


def test_apply_speedups_fuses_quantizes_and_compiles_the_transformer(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    inputs = random_transformer_inputs(pipe.transformer.config, 128, 128, 32)
    with torch.no_grad():
        reference = pipe.transformer(**inputs)[0]
    speed.apply_speedups(pipe, Speedups(activations="int8dq", fuse_qkv=True, attention="math", compile="regional"),
                         device=CPU)
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.fused_projections and block.attn.to_qkv.out_features == 3 * block.attn.to_q.out_features
    assert type(block.attn.to_qkv.weight).__name__ != "Parameter"  # torchao's int8 tensor
    assert block._compiled_call_impl is not None and pipe.transformer._compiled_call_impl is None
    # the int8 matmuls are checked eagerly here (compiling costs a minute on a CPU; the chapter does it)
    pipe.transformer.transformer_blocks.apply(lambda m: setattr(m, "_compiled_call_impl", None))
    pipe.transformer.single_transformer_blocks.apply(lambda m: setattr(m, "_compiled_call_impl", None))
    with torch.no_grad():
        output = pipe.transformer(**inputs)[0]
    assert 20 < ql.quality.sqnr_db(output, reference) < 60


def test_fused_qkv_alone_leaves_the_output_unchanged(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    inputs = random_transformer_inputs(pipe.transformer.config, 128, 128, 32)
    with torch.no_grad():
        reference = pipe.transformer(**inputs)[0]
        speed.apply_speedups(pipe, ql.get_recipe("bf16+fused-qkv"), device=CPU)
        output = pipe.transformer(**inputs)[0]
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections
    assert ql.quality.sqnr_db(output, reference) > 40


def test_a_recipe_with_hand_written_steps_needs_the_lab(tiny_pipe, fa3_installed):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    with pytest.raises(ValueError, match=r"has hand-written steps .*pass "
                                         r"hand_written=quantlab\.lab\.hand_written\.HAND_WRITTEN"):
        speed.apply_speedups(transformer, Speedups(attention="fa3"), device=H100)
    assert not any(type(p).__name__ == "FlashAttention3Processor" for p in transformer.attn_processors.values())
    with pytest.raises(ValueError, match="changes the VAE; pass the whole pipeline"):
        speed.apply_speedups(transformer, Speedups(vae_channels_last=True), device=CPU)


def test_the_eager_and_the_compiling_parts_of_a_recipe_make_the_whole():
    steps = ql.get_recipe(FASTEST_ON_HOPPER).speedups
    eager, compiling = speed.without_compile(steps), speed.only_compile(steps)
    assert eager == dataclasses.replace(steps, compile=None, inductor_flags=False, cuda_graph=False,
                                        gelu_sigmoid=False)
    assert not eager.compile and not eager.cuda_graph and eager.rope_kernel and eager.single_block_kernels
    assert compiling == Speedups(compile="regional", cuda_graph=True, gelu_sigmoid=True)
    assert speed.without_compile(ql.get_recipe("bf16+fused-qkv").speedups) == Speedups(fuse_qkv=True)


def test_static_fp8_observes_then_quantizes_every_linear_that_runs(tiny_pipe):
    import torch._inductor.config as inductor_config

    transformer = copy.deepcopy(tiny_pipe.transformer)
    config = transformer.config
    inputs = random_transformer_inputs(config, 128, 128, 32)
    calibration = [random_transformer_inputs(config, 128, 128, 32, seed=seed) for seed in (1, 2)]
    with torch.no_grad():
        reference = transformer(**inputs)[0]
    steps = Speedups(activations="float8static-tensor", fuse_qkv=True)
    with pytest.raises(ValueError, match="pass calibrate="):  # a bare transformer has no prompt to calibrate on
        speed.apply_speedups(transformer, steps, device=H100)
    assert not transformer.transformer_blocks[0].attn.fused_projections  # refused before anything changed
    with inductor_config.patch(coordinate_descent_tuning=False):
        # H100 described: torchao's static fp8 runs on a CPU too (slowly), which the hardware check would refuse
        speed.apply_speedups(transformer, steps, device=H100, calibrate=lambda: [transformer(**c) for c in calibration])
        assert inductor_config.coordinate_descent_tuning  # set by torchao's convert step, as by its dynamic config
    attention = transformer.transformer_blocks[0].attn
    weight = attention.to_qkv.weight
    assert type(weight).__name__ == "PrototypeFloat8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    assert weight.act_quant_scale.numel() == 1 and weight.act_quant_scale.item() > 0  # one scale for the tensor
    assert type(attention.to_q.weight) is torch.nn.Parameter  # kept beside the fused one, never run: not observed
    assert not any("Observed" in type(m).__name__ for m in transformer.modules())
    with torch.no_grad():
        output = transformer(**inputs)[0]
    assert 15 < ql.quality.sqnr_db(output, reference) < 35


# --- the CUDA graph -----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records a CUDA graph")
def test_a_replayed_cuda_graph_gives_the_recorded_forward_pass_output(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer).to("cuda")
    config = transformer.config
    small, large = (random_transformer_inputs(config, size, size, 32, device="cuda", seed=seed)
                    for size, seed in ((128, 1), (256, 2)))
    with torch.no_grad():
        expected = [transformer(**inputs)[0] for inputs in (small, large)]
        speed.apply_speedups(transformer, Speedups(cuda_graph=True))
        assert isinstance(transformer.forward, speed.CudaGraphForward)
        first = transformer(**small)[0]
        again = transformer(**large)[0], transformer(**small)[0]
    assert len(transformer.forward.graphs) == 2  # one recording per input shape
    for output, reference in zip((first, *again), (expected[0], expected[1], expected[0])):
        assert output.shape == reference.shape and ql.quality.sqnr_db(output, reference) > 40
    assert first.data_ptr() != again[1].data_ptr()  # a copy, not the recorded tensor the next replay overwrites


# --- the floor, and paying for a compile ----------------------------------------------------------


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
    # the peaks are the GPU table's
    h100 = env.GPUS["H100"]
    assert speed.floor_ms_per_step(tflop, "NVIDIA H100 80GB HBM3") == pytest.approx(
        tflop["total_tflop"] / h100.bf16_tflops * 1e3)
    assert env.peak_tflops("NVIDIA H100 PCIe", "bf16") == env.GPUS["H100 PCIe"].bf16_tflops


def test_fused_projections_do_the_same_flops():
    transformer = ql.models.meta_component("tiny", "transformer")
    before = speed.transformer_tflop_per_step(transformer, 128, 128, 32)
    shapes = speed.linear_shapes(transformer, 64, 32)
    transformer.fuse_qkv_projections()
    assert speed.transformer_tflop_per_step(transformer, 128, 128, 32) == pytest.approx(before)
    # the unfused q, k and v kept beside the fused projections do not run, and are not counted
    unused = speed.unused_projections(transformer)
    assert unused and all(name.rsplit(".", 1)[1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                     "add_v_proj") for name in unused)
    fused = speed.linear_shapes(transformer, 64, 32)
    assert sum(fused.values()) < sum(shapes.values())
    assert sum(2 * r * i * o * n for (r, i, o), n in fused.items()) == sum(2 * r * i * o * n
                                                                          for (r, i, o), n in shapes.items())


def test_compile_time_is_paid_back_after_the_break_even_image():
    assert speed.amortized_s_per_image(compile_s=100.0, s_per_image=5.0, images=20) == pytest.approx(10.0)
    assert speed.break_even_images(compile_s=100.0, eager_s_per_image=9.0, compiled_s_per_image=7.0) == 50.0
    assert speed.break_even_images(compile_s=100.0, eager_s_per_image=7.0, compiled_s_per_image=9.0) is None


# --- the committed rows -------------------------------------------------------------------------


def test_the_speed_table_puts_every_committed_row_beside_the_floor():
    table = speed.speed_table()
    assert list(table.columns) == ["recipe", "source", "device", "ms_per_step", "x_bf16_floor", "compile_s",
                                   "sqnr_db", "peak_gpu_mem_gib", "error"]
    alone = table[table["source"] == "transformer alone (chapter 06)"]
    committed = [row for name in speed.SPEED_RESULTS
                 for row in ql.measure.load_rows(ql.measure.results_dir() / f"{name}.json")]
    assert len(alone) == len([row for row in committed if not row.recipe.startswith("vae-decode")])
    assert not table["recipe"].str.startswith("vae-decode").any()
    # every recipe of a committed row is registered, so its row can be re-run by name
    assert all(recipe in ql.recipes.RECIPES for recipe in table["recipe"])
    timed = table.dropna(subset=["x_bf16_floor"])
    assert (timed["x_bf16_floor"] > 1).all()  # nothing beats the floor
    fastest = timed.loc[timed["ms_per_step"].idxmin()]
    assert fastest["recipe"].startswith(FASTEST_ON_HOPPER.removesuffix("+compile-regional+cuda-graph"))
    assert fastest["x_bf16_floor"] == pytest.approx(1.0, abs=0.05)  # within 5% of the bf16 floor on an H200
    pipeline = table[table["source"] != "transformer alone (chapter 06)"]
    assert set(pipeline["source"]) <= {f"whole pipeline (chapter {name[:2]})" for name in speed.PIPELINE_RESULTS}
    assert len(pipeline) > 0 and pipeline["ms_per_step"].notna().all()
