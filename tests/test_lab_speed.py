"""The speed lab (quantlab.lab): the hand-written steps of chapter 06's fastest recipes, their Triton kernels, the
runners that time recipes, attention and matmuls alone, the compute-only replay, profiles and kernel kinds, and the
runner loop that resets process-wide state between scenarios. The course's side is in test_speed.py."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch

import quantlab as ql
from quantlab import speed
from quantlab.env import DeviceInfo
from quantlab.lab import hand_written, kernels
from quantlab.lab import speed as lab
from quantlab.lab.hand_written import HAND_WRITTEN
from quantlab.lab.runner import Scenario, random_transformer_inputs, run_scenarios
from quantlab.recipes import Speedups

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), bf16=True, fp8=True)
CPU = DeviceInfo("cpu", "CPU (x86_64, 2 cores)")
SINGLE_BLOCK_KERNELS = Speedups(activations="float8static-tensor", fuse_qkv=True, attention="fa3-fp8",
                                rope_kernel=True, single_block_kernels=True)
WITHOUT_SINGLE_BLOCK_KERNELS = dataclasses.replace(SINGLE_BLOCK_KERNELS, single_block_kernels=False)
WITH_ONE_MATMUL = dataclasses.replace(SINGLE_BLOCK_KERNELS, fused_qkv_mlp=True)

pytestmark = pytest.mark.usefixtures("keep_the_default_attention_backend")


# --- FlashAttention-3 and the rope kernel -------------------------------------------------------


class SdpaInPlaceOfFa3(hand_written.FlashAttention3Processor):
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
    inputs = random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
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
    assert 30 < ql.quality.sqnr_db(rounded, reference) < 60  # e4m3 keeps 3 mantissa bits of q, k and v


def test_the_hand_written_steps_build_the_fa3_processor_that_the_recipe_asks_for():
    processor = HAND_WRITTEN.attention_processor(SINGLE_BLOCK_KERNELS)
    assert type(processor) is hand_written.FlashAttention3Processor and processor.fp8 and processor.rope_kernel
    processor = HAND_WRITTEN.attention_processor(Speedups(attention="fa3"))
    assert not processor.fp8 and not processor.rope_kernel


def test_the_processor_gives_the_rope_kernel_each_stream_with_its_norms(tiny_pipe, monkeypatch):
    """The kernel's own arithmetic is checked on a GPU (test_the_rope_kernel_matches_diffusers_on_a_gpu)."""
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    inputs = random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="use it with fp8=True"):
        SdpaInPlaceOfFa3(fp8=False, rope_kernel=True)
    calls = []

    def reference(*args, **kwargs):  # what the kernel computes, in PyTorch
        calls.append(len(args))
        return kernels.qk_norm_rope_reference(*args, **kwargs)

    monkeypatch.setattr(hand_written.kernels, "qk_norm_rope_fp8", reference)
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
    monkeypatch.setattr(kernels, "_TRITON", False)
    assert "Triton is not installed" in kernels.triton_problem()
    monkeypatch.setattr(kernels, "_TRITON", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.triton_problem() == "there is no CUDA GPU here"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert re.search(r"compute capability 7\.5, and the kernel writes fp8.*8\.9\+", kernels.triton_problem())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 or H200
    assert kernels.triton_problem() is None


def _differ_by_one_fp8_step_at_most(output: torch.Tensor, reference: torch.Tensor) -> None:
    output, reference = output.float(), reference.float()
    differ = output != reference
    assert differ.float().mean() < 2e-3  # float32 sums in another order flip a rounding now and then
    assert ((output - reference).abs()[differ] <= reference.abs()[differ] / 8 + 2**-9).all()  # by one fp8 step


@pytest.mark.skipif(kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
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
        outputs = kernels.qk_norm_rope_fp8(qkv, norms[0], norms[1], rotary, heads, **streams)
        references = kernels.qk_norm_rope_reference(qkv, norms[0], norms[1], rotary, heads, **streams)
    for output, reference in zip(outputs, references):
        assert output.shape == (2, text_tokens + image_tokens, heads, head_dim) and output.dtype == torch.float8_e4m3fn
        _differ_by_one_fp8_step_at_most(output, reference)
    assert torch.equal(outputs[2].float(), references[2].float())  # v is a plain cast


@pytest.mark.skipif(kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
def test_the_rope_kernel_compiles_in_one_graph_to_what_it_gives_eagerly():
    """Inside a compiled block, torch.compile traces the launch (fullgraph: no break) and runs the same kernel."""
    heads, head_dim, tokens = 2, 128, 48
    norm = torch.nn.RMSNorm(head_dim, eps=1e-6).to("cuda", torch.bfloat16)
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    rotary = (torch.ones(tokens, head_dim, device="cuda"), torch.zeros(tokens, head_dim, device="cuda"))
    compiled = torch.compile(kernels.qk_norm_rope_fp8, fullgraph=True)
    for eager, traced in zip(kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, heads),
                             compiled(qkv, norm, norm, rotary, heads)):
        assert torch.equal(eager.view(torch.uint8), traced.view(torch.uint8))


def test_the_rope_kernel_checks_its_arguments_then_says_what_it_needs_where_it_cannot_run():
    norm, other_eps = torch.nn.RMSNorm(128, eps=1e-6), torch.nn.RMSNorm(128, eps=1e-5)
    qkv, rotary = torch.zeros(1, 4, 384), (torch.ones(4, 128), torch.zeros(4, 128))
    with pytest.raises(ValueError, match=r"shape \(3, 128\); the tokens and head_dim want \(4, 128\)"):
        kernels.qk_norm_rope_fp8(qkv, norm, norm, tuple(x[:3] for x in rotary), 1)
    with pytest.raises(ValueError, match=r"last dimension \(288\) must be 3 × 1 heads × a head_dim that is a power"):
        kernels.qk_norm_rope_fp8(torch.zeros(1, 4, 288), norm, norm, rotary, 1)  # a head_dim of 96
    with pytest.raises(ValueError, match=r"last dimension \(384\) must be 3 × 5 heads"):
        kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, 5)  # 384 is not a multiple of 15
    with pytest.raises(ValueError, match="one RMSNorm eps.*1e-06, another 1e-05"):
        kernels.qk_norm_rope_fp8(qkv, norm, other_eps, rotary, 1)
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: qk_norm_rope_reference"):
        kernels.qk_norm_rope_fp8(qkv, norm, norm, rotary, 1)  # CPU tensors, here or on a GPU machine


# --- the single-block kernels -------------------------------------------------------------------


@pytest.fixture
def twins_of_the_kernels(fa3_installed, triton_installed, monkeypatch):
    """Each Triton kernel replaced by its PyTorch twin, and PyTorch's attention where FA3 runs; yields the calls."""
    calls = []
    for name in ("qk_norm_rope", "layer_norm_modulate", "gelu_cat"):
        reference = getattr(kernels, f"{name}_reference")
        monkeypatch.setattr(hand_written.kernels, f"{name}_fp8",
                            lambda *args, _reference=reference, _name=name, **kwargs: (calls.append(_name),
                                                                                      _reference(*args, **kwargs))[1])
    monkeypatch.setattr(hand_written, "FlashAttention3Processor", SdpaInPlaceOfFa3)
    return calls


def _apply(transformer, steps: Speedups, calibration):
    """`steps` applied to `transformer` (a copy of the tiny one) as on an H100, calibrated on `calibration`."""
    speed.apply_speedups(transformer, steps, device=H100, calibrate=lambda: [transformer(**c) for c in calibration],
                         hand_written=HAND_WRITTEN)
    return transformer


def test_the_single_block_kernels_compute_what_diffusers_block_computes(tiny_pipe, twins_of_the_kernels):
    """The kernels' own arithmetic is checked on a GPU (test_the_single_block_kernels_match_their_references...)."""
    import torch._inductor.config as inductor_config

    calls = twins_of_the_kernels
    config = tiny_pipe.transformer.config
    inputs = random_transformer_inputs(config, 128, 128, 32)
    calibration = [random_transformer_inputs(config, 128, 128, 32, seed=seed) for seed in (1, 2)]
    outputs, transformers = {}, {}
    for steps in (WITHOUT_SINGLE_BLOCK_KERNELS, SINGLE_BLOCK_KERNELS, WITH_ONE_MATMUL):
        transformer = transformers[steps] = copy.deepcopy(tiny_pipe.transformer)
        with inductor_config.patch(coordinate_descent_tuning=False), torch.no_grad():
            _apply(transformer, steps, calibration)
            assert isinstance(transformer.transformer_blocks[0].attn.processor, SdpaInPlaceOfFa3)
            calls.clear()
            outputs[steps] = transformer(**inputs)[0]
            single = ["layer_norm_modulate", "qk_norm_rope", "gelu_cat"] if steps.single_block_kernels else [
                "qk_norm_rope"]
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
    assert hand_written.use_single_block_kernels(transformer) == 0  # installed once
    assert hand_written.fuse_single_block_projections(transformer) == 0
    # the kernels' operands view the torchao weights, and the joined weight is the Linears' own memory: only the
    # joined bias and the scales per output feature (bf16 and float32, one each) are new
    weights = {steps: ql.measure.weights_bytes(transformer) for steps, transformer in transformers.items()}
    qkv, mlp = block.attn.to_qkv, block.proj_mlp
    new_bytes = len(transformer.single_transformer_blocks) * (qkv.out_features + mlp.out_features) * (2 + 4)
    assert weights[SINGLE_BLOCK_KERNELS] == weights[WITHOUT_SINGLE_BLOCK_KERNELS]
    assert weights[WITH_ONE_MATMUL] == weights[SINGLE_BLOCK_KERNELS] + new_bytes


def _with_single_block_kernels(transformer, seeds=(1, 2)):
    """`transformer` (a copy of the tiny one) with SINGLE_BLOCK_KERNELS, calibrated on random inputs of `seeds`."""
    calibration = [random_transformer_inputs(transformer.config, 128, 128, 32, seed=seed) for seed in seeds]
    with torch.no_grad():
        return _apply(transformer, SINGLE_BLOCK_KERNELS, calibration)


def test_one_matmul_runs_both_input_projections_of_a_single_block_with_their_own_scales(tiny_pipe,
                                                                                        twins_of_the_kernels):
    transformer = _with_single_block_kernels(copy.deepcopy(tiny_pipe.transformer))
    block = transformer.single_transformer_blocks[0]
    qkv, mlp = block.attn.to_qkv, block.proj_mlp
    assert torch.equal(qkv.fp8_input_scale, mlp.fp8_input_scale)  # both observed the same normalized tokens
    x = (torch.randn(2, 5, qkv.in_features, generator=torch.Generator().manual_seed(0)) * 50).to(torch.float8_e4m3fn)
    separate = [hand_written.static_fp8_linear(x, linear, torch.bfloat16) for linear in (qkv, mlp)]
    before = [linear.weight.qdata.clone() for linear in (qkv, mlp)]
    tokens = torch.randn(2, 5, qkv.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    torchao_before = [linear(tokens) for linear in (qkv, mlp)]  # torchao's own path: quantize, then matmul
    assert hand_written.fuse_single_block_projections(transformer) == len(transformer.single_transformer_blocks)
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
    both = hand_written.joined_qkv_mlp_linear(x, block, torch.bfloat16)
    assert [tuple(out.shape) for out in both] == [(2, 5, qkv.out_features), (2, 5, mlp.out_features)]
    assert all(torch.equal(a, b) for a, b in zip(both, separate))
    assert all(torch.equal(linear(tokens), out) for linear, out in zip((qkv, mlp), torchao_before))  # on the views


def test_one_matmul_for_both_projections_needs_the_kernels_and_one_input_scale(tiny_pipe, twins_of_the_kernels):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    with pytest.raises(ValueError, match="Single-stream block 0 runs diffusers' own forward.*call "
                                         "use_single_block_kernels\\(transformer\\) first"):
        hand_written.fuse_single_block_projections(transformer)
    _with_single_block_kernels(transformer, seeds=(1,))
    last_index = len(transformer.single_transformer_blocks) - 1
    last = transformer.single_transformer_blocks[last_index].proj_mlp
    last.fp8_input_scale = last.fp8_input_scale * 2
    with pytest.raises(ValueError, match=f"different input scales for them in single-stream block {last_index} .*"
                                         "Instead: calibrate both on the same inputs"):
        hand_written.fuse_single_block_projections(transformer)
    assert not any(hasattr(block, "fp8_qkv_mlp_weight_t") for block in transformer.single_transformer_blocks)


def test_a_single_block_kernels_recipe_refuses_a_transformer_not_in_bf16_before_changing_it(tiny_pipe, fa3_installed,
                                                                                             triton_installed):
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    with pytest.raises(ValueError, match="single-block-kernels round as PyTorch does on bf16 activations, and this "
                                         "transformer is torch.float32. Instead: load it in bf16"):
        speed.apply_speedups(transformer, SINGLE_BLOCK_KERNELS, device=H100, calibrate=lambda: None,
                             hand_written=HAND_WRITTEN)
    assert not transformer.transformer_blocks[0].attn.fused_projections


def test_the_single_block_kernels_need_the_rope_processor_and_static_fp8(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    with pytest.raises(ValueError, match="round as PyTorch does on bf16 activations, and this transformer is "
                                         "torch.float32"):
        hand_written.use_single_block_kernels(copy.deepcopy(transformer).float())
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        hand_written.use_single_block_kernels(transformer)
    assert "forward" not in transformer.single_transformer_blocks[0].__dict__  # refused before any block changed
    transformer.fuse_qkv_projections()
    transformer.set_attn_processor(SdpaInPlaceOfFa3(fp8=True, rope_kernel=True))
    with pytest.raises(ValueError, match="weight is a Parameter. Instead: quantize with float8static-tensor"):
        hand_written.use_single_block_kernels(transformer)
    with pytest.raises(ValueError, match="LoRA scale"):
        hand_written._single_block_with_kernels(transformer.single_transformer_blocks[0], None, torch.zeros(1, 1, 1),
                                                None, joint_attention_kwargs={"scale": 0.5})


def test_the_single_block_kernels_check_their_arguments_then_say_what_they_need_where_they_cannot_run():
    text, image, modulation = (torch.zeros(*shape, dtype=torch.bfloat16) for shape in ((1, 2, 64), (1, 3, 64), (1, 64)))
    scale = torch.ones(1)
    with pytest.raises(ValueError, match="rounds where PyTorch does on bfloat16 activations, and these are "
                                         "torch.float32. Instead: layer_norm_modulate_reference"):
        kernels.layer_norm_modulate_fp8(text.float(), image.float(), modulation, modulation, (scale,))
    with pytest.raises(ValueError, match="one or two static input scales, one number each"):
        kernels.layer_norm_modulate_fp8(text, image, modulation, modulation, (scale,) * 3)
    with pytest.raises(ValueError, match=r"one number each.*\[\(2,\)\]"):
        kernels.gelu_cat_fp8(image, torch.zeros(1, 3, 256), torch.ones(2))
    with pytest.raises(ValueError, match="must share the batch and the last dimension"):
        kernels.layer_norm_modulate_fp8(text, image[..., :32], modulation, modulation, (scale,))
    with pytest.raises(ValueError, match="must have the same tokens"):
        kernels.gelu_cat_fp8(text, torch.zeros(1, 3, 256), scale)
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: layer_norm_modulate_reference"):
        kernels.layer_norm_modulate_fp8(text, image, modulation, modulation, (scale,))
    with pytest.raises(RuntimeError, match="Triton kernel for CUDA GPUs.*Instead: gelu_cat_reference"):
        kernels.gelu_cat_fp8(image, torch.zeros(1, 3, 256), scale)


@pytest.mark.skipif(kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
@pytest.mark.parametrize("scales", [1, 2])
def test_the_single_block_kernels_match_their_references_on_a_gpu(scales):
    generator = torch.Generator("cpu").manual_seed(0)
    dim, mlp_dim, text_tokens, image_tokens = 192, 768, 7, 45  # a dim that is no power of two, as FLUX's 3072
    randn = lambda *shape, s=1.0: (torch.randn(*shape, generator=generator) * s).to("cuda", torch.bfloat16)  # noqa
    text, image = randn(2, text_tokens, dim), randn(2, image_tokens, dim, s=4.0) + 1
    shift, scale, _ = randn(2, 3 * dim, s=0.5).chunk(3, dim=1)  # views into one tensor, as diffusers' chunk gives
    input_scales = tuple(torch.tensor([[s]], device="cuda") for s in (0.01, 0.004)[:scales])
    with torch.no_grad():
        outputs = kernels.layer_norm_modulate_fp8(text, image, shift, scale, input_scales)
        references = kernels.layer_norm_modulate_reference(text, image, shift, scale, input_scales)
    assert len(outputs) == 1 + scales and torch.equal(outputs[0], references[0])  # the joined tokens, copied
    for output, reference in zip(outputs[1:], references[1:]):
        assert output.shape == (2, text_tokens + image_tokens, dim) and output.dtype == torch.float8_e4m3fn
        _differ_by_one_fp8_step_at_most(output, reference)
    projection = randn(2, text_tokens + image_tokens, 3 * dim + mlp_dim, s=3.0)  # the MLP part: a strided view
    attention, mlp = randn(2, text_tokens + image_tokens, dim), projection[..., 3 * dim:]
    with torch.no_grad():
        output = kernels.gelu_cat_fp8(attention, mlp, input_scales[0])
        reference = kernels.gelu_cat_reference(attention, mlp, input_scales[0])
    assert output.shape == (2, text_tokens + image_tokens, dim + mlp_dim)
    assert torch.equal(output[..., :dim].float(), reference[..., :dim].float())  # the attention part: a plain cast
    _differ_by_one_fp8_step_at_most(output, reference)


@pytest.mark.skipif(kernels.triton_problem() is not None, reason="a Triton kernel: needs Triton and a CUDA GPU")
def test_the_single_block_kernels_compile_in_one_graph_to_what_they_give_eagerly():
    text, image = (torch.randn(1, n, 256, device="cuda", dtype=torch.bfloat16) for n in (3, 20))
    shift, scale = torch.zeros(2, 1, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    input_scales = (torch.tensor([[0.01]], device="cuda"),)
    mlp = torch.randn(1, 23, 1024, device="cuda", dtype=torch.bfloat16)

    def block_end(text, image, shift, scale):
        joined, quantized = kernels.layer_norm_modulate_fp8(text, image, shift, scale, input_scales)
        return joined, quantized, kernels.gelu_cat_fp8(joined, mlp, input_scales[0])

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
        quantize_(block, speed._torchao_config("float8static-tensor", step="prepare"))  # new modules
        block.attn.to_qkv(tokens), block.proj_mlp(tokens)
        quantize_(block, speed._torchao_config("float8static-tensor", step="convert"),
                  filter_fn=lambda module, name: hasattr(module, "input_act_obs"))
        linears = (block.attn.to_qkv, block.proj_mlp)
        for linear in linears:
            hand_written._keep_fp8_operands(linear)
        input_scale = linears[0].fp8_input_scale
        x = (tokens.float() / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        separate = [hand_written.static_fp8_linear(x, linear, torch.bfloat16) for linear in linears]
        hand_written.join_qkv_mlp_weights(block)
        both = hand_written.joined_qkv_mlp_linear(x, block, torch.bfloat16)
    for one, two, linear in zip(both, separate, linears):  # against the same fp8 operands in float64
        weight = linear.weight.qdata.double() * linear.fp8_weight_scale.double()
        exact = (x.double() * input_scale.double()) @ weight.T + linear.bias.double()
        assert ql.quality.sqnr_db(one, exact) > ql.quality.sqnr_db(two, exact) - 1 > 40
        assert ql.quality.sqnr_db(one, two) > 40


# --- the GELU as a sigmoid ----------------------------------------------------------------------


def test_gelu_as_a_sigmoid_is_the_tanh_gelu():
    x = torch.linspace(-12, 12, 200_001)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert (hand_written.gelu_tanh_via_sigmoid(x).double() - exact).abs().max() < 2e-6
    assert (hand_written.gelu_tanh_via_sigmoid(x.double()) - exact).abs().max() < 1e-12  # float64 stays float64
    half = x.bfloat16()  # computed in float32, rounded once: at most one bf16 step from F.gelu's own rounding
    step = torch.nn.functional.gelu(half, approximate="tanh").float().abs().clamp(min=1e-3) * 2**-7
    assert ((hand_written.gelu_tanh_via_sigmoid(half).float()
             - torch.nn.functional.gelu(half, approximate="tanh").float()).abs() <= step).all()
    with pytest.raises(ValueError, match="Add a compile step"):
        Speedups(gelu_sigmoid=True)
    assert Speedups(gelu_sigmoid=True, compile="regional").gelu_sigmoid


def test_gelu_sigmoid_changes_every_tanh_gelu_and_not_the_output(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer).float()
    inputs = random_transformer_inputs(transformer.config, 128, 128, 32, dtype=torch.float32)
    with torch.no_grad():
        reference = transformer(**inputs)[0]
        changed = hand_written.use_sigmoid_gelu(transformer)
        output = transformer(**inputs)[0]
    # one in each single-stream block; two in each double-stream block, the image's and the text's feed-forward
    assert changed == len(transformer.single_transformer_blocks) + 2 * len(transformer.transformer_blocks)
    assert isinstance(transformer.single_transformer_blocks[0].act_mlp, hand_written.SigmoidGELU)
    assert transformer.transformer_blocks[0].ff.net[0].gelu is hand_written.gelu_tanh_via_sigmoid
    assert not any(isinstance(m, torch.nn.GELU) for m in transformer.modules())
    assert hand_written.use_sigmoid_gelu(transformer) == 0  # nothing left to rewrite
    assert ql.quality.sqnr_db(output, reference) > 100  # float32 rounding apart
    pipe = copy.deepcopy(tiny_pipe)  # the recipe step: rewritten, then compiled (lazily: nothing runs here)
    steps = Speedups(gelu_sigmoid=True, compile="regional")
    with pytest.raises(ValueError, match="hand-written steps"):  # the course's apply_speedups alone cannot
        speed.apply_speedups(pipe, steps, device=CPU)
    assert isinstance(pipe.transformer.single_transformer_blocks[0].act_mlp, torch.nn.GELU)  # refused, unchanged
    speed.apply_speedups(pipe, steps, device=CPU, hand_written=HAND_WRITTEN)
    block = pipe.transformer.single_transformer_blocks[0]
    assert isinstance(block.act_mlp, hand_written.SigmoidGELU) and block._compiled_call_impl is not None


# --- matmuls, attention and the compute alone ----------------------------------------------------


def test_the_matmuls_of_a_step_are_timed_shape_by_shape():
    row = lab.run_matmuls("bf16", "tiny", height=64, width=64, text_tokens=8, calls=1, warmup=0, repeats=1,
                          device="cpu")
    assert row.recipe == "matmuls-bf16"
    transformer = ql.models.meta_component("tiny", "transformer")
    transformer.fuse_qkv_projections()
    flops = speed.transformer_tflop_per_step(transformer, 64, 64, 8)
    shapes = row.extra["shapes"]
    assert row.extra["linear_tflop"] == pytest.approx(flops["linear_tflop"])
    assert sum(2 * s["rows"] * s["in_features"] * s["out_features"] * s["count"] for s in shapes) / 1e12 == (
        pytest.approx(flops["linear_tflop"]))  # the shapes timed are the step's Linears
    unused = speed.unused_projections(transformer)  # the unfused q, k, v kept beside the fused ones
    assert sum(s["count"] for s in shapes) == sum(
        isinstance(m, torch.nn.Linear) and name not in unused for name, m in transformer.named_modules())
    assert row.ms_per_step == pytest.approx(sum(s["ms"] * s["count"] for s in shapes))
    # the modulation, the text stream, the image stream (4x4 patches) and the joined sequence of the single blocks
    assert {s["rows"] for s in shapes} == {1, 8, 16, 16 + 8}
    with pytest.raises(ql.UnsupportedHardwareError, match="matmuls-fp8 times float8 matmuls"):
        lab.run_matmuls("fp8", "tiny", device="cpu")
    with pytest.raises(ValueError, match="Unknown matmul dtype 'int4': bf16 or fp8"):
        lab.run_matmuls("int4", "tiny", device="cpu")


def test_a_steps_matmuls_and_attention_are_recorded_with_their_operands(tiny_pipe, twins_of_the_kernels):
    transformer = _with_single_block_kernels(copy.deepcopy(tiny_pipe.transformer))
    hand_written.fuse_single_block_projections(transformer)
    inputs = random_transformer_inputs(transformer.config, 128, 128, 32)
    with torch.no_grad():
        output = transformer(**inputs)[0]
        calls = lab.record_compute_calls(lambda: transformer(**inputs))
        replayed = lab.replay_compute_calls(calls)
    flops = speed.transformer_tflop_per_step(transformer, 128, 128, 32)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    attention = [c for c in calls if c.kind == "attention"]
    assert len(attention) == blocks  # the tests' stand-in for FA3 is PyTorch's CPU kernel
    assert sum(c.tflop for c in attention) == pytest.approx(flops["attention_tflop"])
    # every Linear that runs, once, as torch._scaled_mm (static fp8 quantizes them all), and each single-stream
    # block's to_qkv and proj_mlp as one
    assert sum(c.tflop for c in calls if c.kind == "matmul") == pytest.approx(flops["linear_tflop"])
    assert {c.op.overloadpacket.__name__ for c in calls if c.kind == "matmul"} == {"_scaled_mm"}
    unused = speed.unused_projections(transformer)
    linears = sum(isinstance(m, torch.nn.Linear) and name not in unused for name, m in transformer.named_modules())
    assert len(calls) - len(attention) == linears - len(transformer.single_transformer_blocks)
    # the operands are the step's own: the last call, replayed, gives the transformer's output
    assert calls[-1].kind == "matmul" and torch.equal(replayed[-1].view_as(output), output)


def test_the_compute_only_step_times_the_recorded_calls_of_the_eager_recipe():
    row = lab.run_compute_only("bf16+fused-qkv+compile-regional", "tiny", height=64, width=64, text_tokens=8,
                               warmup=0, repeats=2, device="cpu")
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
    with pytest.raises(ValueError, match="Unknown recipe 'compute-only:bf16'"):  # a recipe's name, not a variant's
        lab.run_compute_only("compute-only:bf16", "tiny", device="cpu")
    with pytest.raises(ql.UnsupportedHardwareError, match=r"'bf16\+fused-qkv\+attn-fa3\+compile-regional\+cuda-graph' "
                                                          r"needs a CUDA GPU"):
        lab.run_compute_only("bf16+fused-qkv+attn-fa3+compile-regional+cuda-graph", "tiny", device="cpu")


def test_attention_alone_is_timed_at_flux_dev_shape_and_checked_against_float32():
    row = lab.run_attention("native", tokens=256, heads=2, head_dim=64, blocks=57, calls=2, warmup=1, repeats=2,
                            device="cpu")
    assert row.recipe == "attention-native"
    extra = row.extra
    assert extra["tflop_per_call"] == pytest.approx(4 * 256**2 * 2 * 64 / 1e12)
    assert row.ms_per_step == pytest.approx(57 * extra["attention_ms"])
    assert extra["tflops"] == pytest.approx(extra["tflop_per_call"] / extra["attention_ms"] * 1e3)
    assert 40 < extra["sqnr_db"] < 70  # bf16 inputs and output against float32 arithmetic
    with pytest.raises(ValueError, match="Unknown attention 'sage'. Valid: native, .*, fa3, fa3-fp8"):
        lab.run_attention("sage", device="cpu")
    with pytest.raises(ql.UnsupportedHardwareError, match="attention-fa3-fp8.*Hopper"):
        lab.run_attention("fa3-fp8", device="cpu")


# --- the runners --------------------------------------------------------------------------------


def test_the_runner_times_a_recipe_and_compares_it_with_bf16(tmp_path):
    reference = tmp_path / "bf16.safetensors"
    bf16 = lab.run_speed_recipe("bf16", "tiny", height=128, width=128, text_tokens=32, warmup=1, repeats=2,
                                reference=str(reference))
    assert reference.exists() and bf16.extra["sqnr_db"] == float("inf")
    from safetensors.torch import load_file

    saved = load_file(reference)["output"]
    assert saved.dtype == torch.float32 and saved.shape == (1, 64, 64)  # the output, saved as safetensors
    row = lab.run_speed_recipe("bf16+attn-math", "tiny", height=128, width=128, text_tokens=32, warmup=1,
                               repeats=2, reference=str(reference))
    assert row.ms_per_step > 0 and row.repeats == 2 and row.extra["compile_s"] is None
    assert 30 < row.extra["sqnr_db"] < float("inf")  # another attention kernel: not identical, but close
    assert row.extra["total_tflop"] == pytest.approx(bf16.extra["total_tflop"])
    assert "compiled_vs_eager_sqnr_db" not in row.extra  # eager: nothing compiled to check
    assert torch.equal(load_file(reference)["output"], saved)  # written by the bf16 run alone


@pytest.mark.parametrize("miscompiled", [False, True])
def test_the_runner_checks_a_compiled_recipe_against_its_eager_output(monkeypatch, miscompiled):
    """Compiling costs a minute on a CPU: here compile_repeated_blocks compiles nothing, or breaks a weight."""
    from diffusers import ModelMixin

    def compile_repeated_blocks(self, **options):
        compile_repeated_blocks.calls.append(options)
        if miscompiled:  # a compile that changed the result (chapter 03 shows a real one)
            with torch.no_grad():
                self.proj_out.weight.mul_(1.5)

    compile_repeated_blocks.calls = []
    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", compile_repeated_blocks)
    row = lab.run_speed_recipe("bf16+compile-regional", "tiny", height=64, width=64, text_tokens=8, warmup=0,
                               repeats=1, device="cpu")
    assert compile_repeated_blocks.calls == [{"fullgraph": True, "mode": None}]
    assert row.recipe == "bf16+compile-regional" and row.extra["compiled_region"] == "repeated blocks"
    assert row.extra["compile_s"] is not None
    if miscompiled:
        assert row.extra["compiled_vs_eager_sqnr_db"] < ql.quality.COMPILE_AGREEMENT_DB
        assert row.extra["compile_disagrees"] is True and "COMPILED OUTPUT DISAGREES WITH EAGER" in row.notes
    else:
        assert row.extra["compiled_vs_eager_sqnr_db"] == float("inf")
        assert row.extra["compile_disagrees"] is False and "DISAGREES" not in row.notes


def test_the_pipeline_runner_times_a_recipe_in_a_whole_pipeline():
    row = lab.run_speed_pipeline("bf16+fused-qkv", "tiny", height=64, width=64, steps=3, repeats=2, device="cpu")
    assert (row.recipe, row.steps, row.repeats, row.height) == ("bf16+fused-qkv", 3, 2, 64)
    assert row.s_per_image > row.ms_per_step / 1e3 > 0
    assert row.extra.get("compile_s") is None and "whole pipeline" in row.notes
    with pytest.raises(ql.UnsupportedHardwareError, match="CUDA graph"):
        lab.run_speed_pipeline("bf16+fused-qkv+attn-cudnn+compile-regional+cuda-graph", "tiny", device="cpu")


def test_vae_variants_are_named_and_timed():
    assert lab.VaeDecode().name == "vae-decode"
    assert lab.VaeDecode(channels_last=True).name == "vae-decode+channels-last"
    assert lab.VaeDecode(compile=True).name == "vae-decode+compile"
    assert lab.VaeDecode(channels_last=True, compile=True).name == "vae-decode+channels-last+compile"
    row = lab.run_vae_decode(lab.VaeDecode(channels_last=True), "tiny", height=64, width=64, warmup=0, repeats=1,
                             device="cpu")
    assert row.recipe == "vae-decode+channels-last" and row.s_per_image > 0 and row.extra["compile_s"] is None


def test_run_scenarios_puts_back_the_process_state_a_scenario_changes(tiny_pipe, tmp_path):
    import torch._inductor.config as inductor_config
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = {flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS}
    assert before != speed.INDUCTOR_FLAGS
    fused_before = inductor_config.force_fuse_int_mm_with_mul
    seen = {}
    steps = Speedups(attention="math", compile="regional", inductor_flags=True)

    def apply_only():  # a runner's scenario, less the compiling and timing, which cost a minute here
        speed.apply_speedups(copy.deepcopy(tiny_pipe.transformer), steps, device=CPU)
        seen.update({flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS})
        seen["backend"] = _AttentionBackendRegistry.get_active_backend()[0]
        inductor_config.force_fuse_int_mm_with_mul = True  # as torchao's fp8 configs do, for the whole process
        return ql.measure.new_row("tiny", "bf16+attn-math+compile-regional+inductor-flags", "cpu", ms_per_step=1.0)

    rows = run_scenarios([Scenario("bf16+attn-math+compile-regional+inductor-flags", apply_only)],
                         tmp_path / "rows.json", model="tiny", device="cpu")
    assert {flag: seen[flag] for flag in speed.INDUCTOR_FLAGS} == speed.INDUCTOR_FLAGS  # what a compile would see
    assert seen["backend"] == "_native_math"  # set_attention_backend() changed the process-wide default
    assert {flag: getattr(inductor_config, flag) for flag in speed.INDUCTOR_FLAGS} == before
    assert inductor_config.force_fuse_int_mm_with_mul == fused_before  # the next scenario starts from the defaults
    assert _AttentionBackendRegistry.get_active_backend()[0] == "native"
    assert [row.recipe for row in rows] == ["bf16+attn-math+compile-regional+inductor-flags"]
    assert ql.measure.load_rows(tmp_path / "rows.json") == rows


# --- profiles -----------------------------------------------------------------------------------


def test_kernel_kinds_name_gpu_kernels_and_cpu_operators():
    assert lab.kernel_kind("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert lab.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert lab.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert lab.kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert lab.kernel_kind("triton_poi_fused__to_copy_add_mul_0") == "fused by inductor"
    # named after what it feeds, but it is elementwise work: the activations' fp8 scaling, or RMSNorm and RoPE
    assert lab.kernel_kind("triton_poi_fused__scaled_mm__to_copy_clamp_div_gelu_t_view_27") == "fused by inductor"
    assert lab.kernel_kind("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_") == \
        "fused by inductor"
    assert lab.kernel_kind("triton_tem_fused_addmm_0") == "matmul"
    assert lab.kernel_kind("_qk_norm_rope_fp8_kernel") == "rope kernel"
    assert {lab.kernel_kind(f"_{name}_fp8_kernel") for name in ("layer_norm_modulate", "gelu_cat")} == {
        "single-block kernels"}
    assert lab.kernel_kind("aten::addmm") == "matmul" and lab.kernel_kind("aten::copy_") == "other"
    assert {kind for kind, _ in lab.KERNEL_KINDS} | {"other"} == {
        "attention", "matmul", "fused by inductor", "rope kernel", "single-block kernels", "other"}


def test_profile_step_says_where_the_time_goes():
    linear, q = torch.nn.Linear(256, 256), torch.randn(1, 4, 256, 64)

    def step():
        with torch.no_grad():
            linear(torch.randn(2048, 256))
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    profile = lab.profile_step(step, steps=2, device="cpu", top=5)
    by_kind = profile["ms_per_step_by_kind"]
    assert {"matmul", "attention"} <= set(by_kind) and all(ms > 0 for ms in by_kind.values())
    assert profile["profiled_ms_per_step"] == pytest.approx(sum(by_kind.values()))
    assert len(profile["top_kernels"]) <= 5 and {k["kind"] for k in profile["top_kernels"]} >= {"matmul", "attention"}


# --- random inputs ------------------------------------------------------------------------------


def test_random_transformer_inputs_fit_the_transformer(tiny_path):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    inputs = random_transformer_inputs(transformer.config, 128, 64, text_tokens=16, seed=3)
    assert inputs["hidden_states"].shape == (1, 8 * 4, transformer.config.in_channels)
    assert inputs["img_ids"].shape == (32, 3) and inputs["txt_ids"].shape == (16, 3)
    with torch.no_grad():
        output = transformer(**inputs)[0]
    assert output.shape == inputs["hidden_states"].shape and torch.isfinite(output).all()
    again = random_transformer_inputs(transformer.config, 128, 64, text_tokens=16, seed=3)
    assert torch.equal(again["encoder_hidden_states"], inputs["encoder_hidden_states"])
