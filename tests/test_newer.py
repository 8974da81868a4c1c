"""Tests for quantlab.newer: BFL files and their checks, AutoRound's offline quantization, diffusers' own checks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel

import quantlab as ql
from quantlab import newer


@pytest.fixture(scope="module")
def bfl_file(tiny_path, tmp_path_factory):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", dtype=torch.bfloat16)
    return newer.write_bfl_file(transformer, tmp_path_factory.mktemp("bfl") / "tiny-fp8r.safetensors")


def test_a_bfl_file_has_a_scale_for_every_float8_weight(bfl_file):
    counts = newer.check_bfl_file(bfl_file)
    assert counts["F8_E4M3"] > 0 and counts["F32"] == counts["F8_E4M3"]  # one float32 scale per float8 weight


def test_copy_without_drops_only_what_it_is_told(bfl_file, tmp_path):
    from safetensors.torch import load_file

    out = newer.copy_without(bfl_file, tmp_path / "copy.safetensors", lambda name: name.endswith(".weight_scale"))
    original, copy = load_file(str(bfl_file)), load_file(str(out))
    assert set(copy) == {name for name in original if not name.endswith(".weight_scale")}
    assert all(torch.equal(copy[name].view(torch.uint8), original[name].view(torch.uint8)) for name in copy)


def test_check_bfl_file_refuses_each_damage(bfl_file, tmp_path):
    data = bfl_file.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    scale = next(name for name in header if name.endswith(".weight_scale"))
    one_missing = newer.copy_without(bfl_file, tmp_path / "one.safetensors", lambda name: name == scale)
    with pytest.raises(newer.BFLFileError, match=r"1 float8 weights have no \.weight_scale"):
        newer.check_bfl_file(one_missing)
    none = newer.copy_without(bfl_file, tmp_path / "none.safetensors", lambda name: name.endswith(".weight_scale"))
    with pytest.raises(newer.BFLFileError, match="no .weight_scale tensors"):
        newer.check_bfl_file(none)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bfl_file.read_bytes()[: bfl_file.stat().st_size // 2])
    with pytest.raises(newer.BFLFileError, match="truncated"):
        newer.check_bfl_file(cut)


def test_environment_checks_reads_nunchakus_checks_in_order():
    from diffusers.quantizers.nunchaku.nunchaku_quantizer import NunchakuLiteQuantizer

    checks = newer.environment_checks(NunchakuLiteQuantizer)
    assert [c["raises"] for c in checks] == ["ImportError", "ValueError", "ValueError", "ValueError", "ValueError"]
    assert checks[0]["if"] == "not is_kernels_available()" and "kernels" in checks[0]["message"]
    assert checks[2]["if"] == "device_capability[0] == 9" and "Hopper" in checks[2]["message"]
    assert [c["line"] for c in checks] == sorted(c["line"] for c in checks)


def test_environment_checks_shows_an_f_string_as_written():
    class Quantizer:
        def validate_environment(self, level):
            if level > 2:
                raise ValueError(f"level {level} is too high")

    (check,) = newer.environment_checks(Quantizer)
    assert check["if"] == "level > 2" and check["raises"] == "ValueError"
    assert check["message"] == "f'level {level} is too high'"


def test_quiet_progress_bars_turns_bars_and_the_empty_notice_off_and_back_on(tmp_path):
    from tqdm import tqdm

    import transformers

    logger = logging.getLogger("diffusers.models.modeling_utils")
    with open(tmp_path / "bars.txt", "w") as sink:
        with newer._quiet_progress_bars():
            assert tqdm(range(3), file=sink).disable
            assert not transformers.utils.logging.is_progress_bar_enabled()
            assert not logger.filters[-1].filter(logging.makeLogRecord(
                {"msg": "There are modules in X that should be kept in float32: []. Casting"}))
            assert logger.filters[-1].filter(logging.makeLogRecord({"msg": "should be kept in float32: ['norm']"}))
        assert not tqdm(range(3), file=sink).disable
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert not any(isinstance(f, newer._Matching) for f in logger.filters)


def test_autoround_quantize_writes_a_checkpoint_diffusers_loads(tiny_path, tmp_path):
    import gc

    call = ql.get_model("tiny").call_kwargs()
    out = newer.autoround_quantize(tiny_path, tmp_path / "rtn", ["a red circle", "a blue square"], iters=0,
                                   call_kwargs=call)
    assert gc.get_freeze_count() == 0  # what the helper froze is collectable again
    assert (out / "calibration.tsv").read_text().splitlines() == ["id\tcaption", "0\ta red circle", "1\ta blue square"]
    assert newer.check_prequantized(out) == "auto-round"
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((out / "transformer").glob("model*.safetensors"))
    transformer = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer", dtype=torch.bfloat16)
    quantized = [m for m in transformer.modules() if type(m).__name__ == "QuantLinear"]
    assert quantized and all(m.bits == 4 for m in quantized)
