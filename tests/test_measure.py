"""Tests for quantlab.measure: stored bytes, timing, host memory and result files (error figures: test_quality)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import quantlab as ql
from quantlab import env, measure
from quantlab.measure import (
    GIB,
    Measurement,
    TimingStats,
    component_weights_bytes,
    load_results,
    load_rows,
    memory_after_load_gib,
    new_row,
    peak_gpu_memory_gib,
    record,
    save_rows,
    tensor_storage_bytes,
    time_callable,
    time_generation,
    track_peak_host_rss,
    weights_bytes,
)


# --- weights_bytes / tensor_storage_bytes ---------------------------------------------------------


def test_weights_bytes_plain_linear_bf16():
    layer = torch.nn.Linear(256, 512, bias=True).to(torch.bfloat16)
    assert weights_bytes(layer) == (256 * 512 + 512) * 2


def test_weights_bytes_counts_tied_weight_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 32, bias=False)
            self.b = torch.nn.Linear(16, 32, bias=False)
            self.b.weight = self.a.weight  # the same Parameter, registered twice

    module = Tied()
    assert module.a.weight is module.b.weight
    assert weights_bytes(module) == 16 * 32 * 4  # fp32, once


def test_weights_bytes_counts_memory_that_views_share_once():
    module = torch.nn.Linear(16, 32, bias=False)
    module.register_buffer("weight_t", module.weight.detach().t(), persistent=False)  # the same memory, transposed
    module.register_buffer("rows", module.weight.detach()[8:24], persistent=False)  # part of it
    assert weights_bytes(module) == 16 * 32 * 4
    module.register_buffer("joined", torch.cat([module.weight.detach(), torch.zeros(4, 16)]), persistent=False)
    assert weights_bytes(module) == (16 * 32 + 36 * 16) * 4  # a copy is memory of its own


def test_weights_bytes_counts_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.BatchNorm1d(4))
    module.register_buffer("table", torch.zeros(10, dtype=torch.float64))
    # Linear 8*4 fp32; BatchNorm weight+bias 2*4 fp32, running_mean/var 2*4 fp32, num_batches_tracked int64
    expected = 8 * 4 * 4 + 2 * 4 * 4 + 2 * 4 * 4 + 8 + 10 * 8
    assert weights_bytes(module) == expected


def test_tensor_storage_bytes_plain_tensors():
    assert tensor_storage_bytes(torch.zeros(3, 5, dtype=torch.float16)) == 30
    assert tensor_storage_bytes(torch.zeros(7, dtype=torch.float8_e4m3fn)) == 7
    assert tensor_storage_bytes(torch.zeros(2, 2, dtype=torch.int64)) == 32


def test_tensor_storage_bytes_torchao_int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(torch.bfloat16)
    bf16_bytes = 256 * 256 * 2
    quantize_(model, Int8WeightOnlyConfig())
    weight = model[0].weight
    # the logical size still claims bf16
    assert weight.numel() * weight.element_size() == bf16_bytes
    stored = tensor_storage_bytes(weight)
    assert stored >= 256 * 256  # at least the int8 data
    assert 0.5 * bf16_bytes <= stored <= 0.56 * bf16_bytes
    # the bias stays bf16 and is counted as such
    assert model[0].bias.dtype == torch.bfloat16
    assert weights_bytes(model) == stored + 256 * 2


def test_tensor_storage_bytes_quanto_int8():
    from optimum.quanto import freeze, qint8, quantize

    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    bf16_bytes = 256 * 256 * 2
    quantize(model, weights=qint8)
    freeze(model)
    weight = model[0].weight
    assert weight.numel() * weight.element_size() == bf16_bytes
    stored = tensor_storage_bytes(weight)
    assert stored >= 256 * 256
    assert 0.5 * bf16_bytes <= stored <= 0.56 * bf16_bytes
    # QLinear adds two scalar bf16 buffers (input_scale, output_scale), which count too
    assert sorted(name for name, _ in model.named_buffers()) == ["0.input_scale", "0.output_scale"]
    assert weights_bytes(model) == stored + 2 * 2


def _bnb_linear4bit(compress_statistics: bool):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 256, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16,
                              compress_statistics=compress_statistics)
    weight = torch.randn(256, 256, dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=compress_statistics, module=layer)
    layer = layer.to("cpu")  # bitsandbytes 0.50 quantizes here, on the CPU (Params4bit.to -> _quantize)
    if not layer.weight.bnb_quantized:
        pytest.skip("bitsandbytes did not quantize Params4bit on the CPU")
    return layer


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_tensor_storage_bytes_bnb_nf4_cpu():
    layer = _bnb_linear4bit(compress_statistics=False)
    weight, state = layer.weight, layer.weight.quant_state
    bf16_bytes = 256 * 256 * 2
    assert weight.dtype == torch.uint8
    assert _nbytes(weight) == 256 * 256 // 2  # two 4-bit values per byte
    assert state.absmax.dtype == torch.float32
    assert state.absmax.numel() == 256 * 256 // 64  # one fp32 scale per block of 64
    assert state.code.dtype == torch.float32
    assert state.code.numel() in (16, 256)
    expected = 256 * 256 // 2 + (256 * 256 // 64) * 4 + state.code.numel() * 4
    assert tensor_storage_bytes(weight) == expected
    assert tensor_storage_bytes(weight) <= 0.3 * bf16_bytes
    assert weights_bytes(layer) == expected


def test_tensor_storage_bytes_bnb_nf4_double_quant_counts_nested_state():
    layer = _bnb_linear4bit(compress_statistics=True)
    weight, state = layer.weight, layer.weight.quant_state
    assert state.nested and state.state2 is not None
    assert state.absmax.dtype == torch.uint8  # the scales are themselves quantized to 8 bits
    expected = (256 * 256 // 2 + _nbytes(state.absmax) + _nbytes(state.code) + _nbytes(state.offset)
                + _nbytes(state.state2.absmax) + _nbytes(state.state2.code))
    assert tensor_storage_bytes(weight) == expected
    assert tensor_storage_bytes(weight) < tensor_storage_bytes(_bnb_linear4bit(False).weight)


def test_tensor_storage_bytes_bnb_int8_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(256, 256, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(256, 256, dtype=torch.bfloat16), requires_grad=False,
                                     has_fp16_weights=False)
    layer = layer.to("cpu")
    if layer.weight.SCB is None:
        pytest.skip("bitsandbytes did not quantize Int8Params on the CPU")
    assert layer.weight.dtype == torch.int8
    assert layer.weight.SCB.dtype == torch.float32 and layer.weight.SCB.numel() == 256
    assert tensor_storage_bytes(layer.weight) == 256 * 256 + 256 * 4
    before = weights_bytes(layer)
    with torch.no_grad():
        layer(torch.randn(4, 256, dtype=torch.bfloat16))  # bitsandbytes moves SCB from the weight to layer.state
    assert weights_bytes(layer) == before == 256 * 256 + 256 * 4


# --- timing -------------------------------------------------------------------------------------


def test_time_callable_sleep_and_call_count():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)

    stats = time_callable(fn, warmup=2, repeats=3, device="cpu")
    assert len(calls) == 2 + 3
    assert stats.repeats == 3
    assert 0.018 <= stats.median_s <= 0.05
    assert stats.min_s <= stats.median_s <= stats.max_s
    assert stats.min_s >= 0.018


def test_timing_stats_of_known_samples():
    stats = TimingStats.of([5, 1, 4, 2, 3])
    assert stats.median_s == 3
    assert stats.min_s == 1
    assert stats.max_s == 5
    assert stats.iqr_s == pytest.approx(2.0, abs=1e-12)
    assert stats.repeats == 5


def test_timing_stats_single_and_empty():
    one = TimingStats.of([0.5])
    assert (one.median_s, one.iqr_s, one.min_s, one.max_s, one.repeats) == (0.5, 0.0, 0.5, 0.5, 1)
    with pytest.raises(ValueError, match="at least one sample"):
        TimingStats.of([])


def test_time_generation_on_tiny_pipe(tiny_pipe):
    kwargs = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 3}
    timing = time_generation(tiny_pipe, "a red circle", kwargs, seed=0, warmup=0, repeats=2, device="cpu")
    assert timing.per_image.repeats == 2
    assert timing.per_step.repeats == 2 * (3 - 1)  # the first step of each image is left out
    assert timing.image.size == (128, 128)
    assert 0 < timing.per_step.median_s < timing.per_image.median_s


# --- memory -------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_track_peak_host_rss_sees_an_allocation():
    with track_peak_host_rss() as baseline:
        pass
    with track_peak_host_rss() as peak:
        block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, written, so resident
        assert int(block[::4096].sum()) == block[::4096].size
        del block
    assert baseline.gib is not None and peak.gib is not None
    assert peak.gib - baseline.gib >= 0.25
    if os.access("/proc/self/clear_refs", os.W_OK):  # the kernel's exact peak, as on any normal Linux
        assert peak.method == baseline.method == "VmHWM (kernel peak, reset by /proc/self/clear_refs)"
    else:  # a locked-down /proc: the sampling fallback
        assert peak.method.startswith("psutil RSS sampled every 5 ms")


def test_memory_after_load_on_cpu_is_weight_bytes(tiny_pipe):
    per_component = component_weights_bytes(tiny_pipe)
    assert set(per_component) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert memory_after_load_gib(tiny_pipe, "cpu") == sum(per_component.values()) / 2**30
    assert GIB == 2**30


def test_component_weights_bytes_matches_param_counts(tiny_pipe):
    # The tiny model is all bf16: 2 bytes per parameter, plus any buffers.
    counts = ql.models.component_param_counts("tiny")
    per_component = component_weights_bytes(tiny_pipe)
    for name, module in tiny_pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        buffer_bytes = sum(_nbytes(b) for b in module.buffers())
        assert per_component[name] == 2 * counts[name] + buffer_bytes, name


def test_memory_after_load_needs_pipe_on_cpu():
    with pytest.raises(ValueError, match="needs the pipeline"):
        memory_after_load_gib(None, "cpu")


def test_peak_gpu_memory_is_none_on_cpu():
    assert peak_gpu_memory_gib("cpu") is None
    assert peak_gpu_memory_gib("cpu", reserved=False) is None


# --- results ------------------------------------------------------------------------------------


def _rows() -> list[Measurement]:
    info = env.DeviceInfo(kind="cuda", name="Test GPU", compute_capability=(9, 0))
    return [
        new_row("tiny", "bf16", info, height=128, width=128, steps=4, mem_after_load_gib=0.031,
                weights_bytes=33_350_638, ms_per_step=12.5, psnr_db=float("inf"), notes="baseline",
                extra={"seed": 0, "prompt": "a cat"}),
        new_row("tiny", "quanto-int8", info, mem_after_load_gib=0.0172, ms_per_step=17.25, ms_per_step_iqr=0.5,
                psnr_db=39.08045349873605, ssim=0.9981193257343138, repeats=3),
    ]


def test_new_row_stamps_device_versions_and_date():
    before = dt.datetime.now(dt.timezone.utc).date()
    row = new_row("tiny", "bf16", "cpu", steps=4)
    after = dt.datetime.now(dt.timezone.utc).date()
    assert row.model == "tiny" and row.recipe == "bf16" and row.steps == 4
    assert row.device == env.device_info("cpu").label
    assert "torch" in row.versions and "diffusers" in row.versions
    assert row.versions == env.package_versions()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.date)
    assert dt.date.fromisoformat(row.date) in (before, after)
    gpu = new_row("tiny", "bf16", env.DeviceInfo(kind="cuda", name="Tesla T4", compute_capability=(7, 5)))
    assert gpu.device == "Tesla T4 (cc 7.5)"
    assert gpu.mem_after_load_gib is None and gpu.notes == "" and gpu.extra == {}


def test_save_and_load_json_round_trip(tmp_path):
    rows = _rows()
    path = save_rows(rows, tmp_path / "sub" / "rows.json")
    assert path == tmp_path / "sub" / "rows.json"
    assert isinstance(json.loads(path.read_text()), list)
    loaded = load_rows(path)
    assert loaded == rows
    assert loaded[1].psnr_db == 39.08045349873605
    assert loaded[0].psnr_db == float("inf")
    assert loaded[0].extra == {"seed": 0, "prompt": "a cat"}


def test_load_rows_ignores_unknown_keys(tmp_path):
    row = _rows()[0]
    record_ = dataclasses.asdict(row)
    record_["from_the_future"] = 1
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([record_]))
    assert load_rows(path) == [row]


def test_save_rows_json_converts_numpy_scalars(tmp_path):
    row = dataclasses.replace(_rows()[1], ms_per_step=np.float64(3.25), repeats=np.int64(7))
    loaded = load_rows(save_rows([row], tmp_path / "np.json"))
    assert loaded[0].ms_per_step == 3.25 and type(loaded[0].ms_per_step) is float
    assert loaded[0].repeats == 7 and type(loaded[0].repeats) is int


def test_save_rows_csv_reads_back_with_pandas(tmp_path):
    import pandas as pd

    rows = _rows()
    path = save_rows(rows, tmp_path / "rows.csv")
    frame = pd.read_csv(path)
    assert list(frame.columns) == [f.name for f in dataclasses.fields(Measurement)]
    assert len(frame) == 2
    assert list(frame["recipe"]) == ["bf16", "quanto-int8"]
    assert frame["ms_per_step"].tolist() == [12.5, 17.25]
    assert frame["weights_bytes"].iloc[0] == 33_350_638


def test_save_rows_unknown_suffix_raises(tmp_path):
    with pytest.raises(ValueError, match=r"rows\.parquet.*\.json or \.csv"):
        save_rows(_rows(), tmp_path / "rows.parquet")
    assert not (tmp_path / "rows.parquet").exists()


def test_json_default_writes_numpy_numbers_as_numbers_and_the_rest_as_text():
    assert measure.json_default(np.float32(1.5)) == 1.5 and type(measure.json_default(np.float32(1.5))) is float
    assert measure.json_default(np.int64(7)) == 7 and type(measure.json_default(np.int64(7))) is int
    assert measure.json_default(torch.bfloat16) == "torch.bfloat16"
    assert measure.json_default(Path("results") / "a.json") == str(Path("results") / "a.json")
    text = json.dumps({"dtype": torch.float16, "n": np.int32(3)}, default=measure.json_default)
    assert json.loads(text) == {"dtype": "torch.float16", "n": 3}


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def test_save_rows_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = save_rows(_rows(), tmp_path / "rows.csv")
    before = path.read_text()

    class HalfWritten:  # a writer that dies halfway (a full disk, a killed run)
        def to_csv(self, partial, index):
            Path(partial).write_text("model,recipe\ntiny,")
            raise OSError("No space left on device")

    monkeypatch.setattr(measure, "to_frame", lambda records: HalfWritten())
    with pytest.raises(OSError, match="No space left"):
        save_rows(_rows()[:1], path)
    assert path.read_text() == before  # the old file, whole
    assert _partials(tmp_path) == []  # and no debris beside it


def test_save_rows_writes_through_a_partial_and_clears_those_of_dead_writers(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".rows.json.partial-{int(dead.stdout)}"  # left by a writer that was killed
    stale.write_text("[{")
    written = []
    real_atomic_output = measure.atomic_output

    def watched(target):
        written.append(target)
        return real_atomic_output(target)

    monkeypatch.setattr(measure, "atomic_output", watched)
    rows = _rows()
    path = save_rows(rows, tmp_path / "rows.json")
    assert written == [path] and load_rows(path) == rows
    assert _partials(tmp_path) == []


def test_load_rows_corrupt_json_names_the_file(tmp_path):
    path = tmp_path / "broken-results.json"
    path.write_text('[{"model": "tiny",')
    with pytest.raises(ValueError, match="broken-results.json") as info:
        load_rows(path)
    assert "not valid JSON" in str(info.value)


def test_load_results_reads_from_results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path))
    save_rows(_rows(), tmp_path / "h100.json")
    save_rows(_rows()[:1], tmp_path / "a100.json")
    assert measure.results_dir() == tmp_path
    frame = load_results("h100")
    assert list(frame["recipe"]) == ["bf16", "quanto-int8"]
    assert frame["psnr_db"].iloc[1] == 39.08045349873605
    with pytest.raises(FileNotFoundError) as info:
        load_results("t4")
    message = str(info.value)
    assert "'t4'" in message
    assert "Available: a100, h100." in message


def test_load_results_with_no_results_says_none(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Available: none"):
        load_results("h100")


def test_record_writes_into_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RUN_DIR", str(tmp_path))
    rows = _rows()
    frame = record(rows, "03_torchao")
    path = tmp_path / "measurements" / "03_torchao.json"
    assert path.is_file()
    assert load_rows(path) == rows
    assert len(frame) == 2 and list(frame["recipe"]) == ["bf16", "quanto-int8"]


def test_record_without_run_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTLAB_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("record must not save without QUANTLAB_RUN_DIR")

    monkeypatch.setattr(measure, "save_rows", fail)
    frame = record(_rows(), "03_torchao")
    assert len(frame) == 2
    assert list(tmp_path.iterdir()) == []


# --- folder size, projected time, per-device peak (added with chapter 01) -------------------------


def test_folder_bytes_adds_nested_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "y.json").write_text("12345")
    assert measure.folder_bytes(tmp_path) == 1005


def test_projected_s_per_image_adds_the_missing_steps():
    row = {"s_per_image": 46.0, "ms_per_step": 4400.0, "steps": 10}
    assert measure.projected_s_per_image(row, steps=50) == pytest.approx(46.0 + 40 * 4.4)
    assert measure.projected_s_per_image({**row, "steps": 50}, steps=50) == 46.0
    assert measure.projected_s_per_image({**row, "ms_per_step": None}) is None


def test_per_device_peak_is_none_on_a_cpu():
    assert measure.peak_gpu_memory_per_device_gib("cpu") is None


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "results").glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_results_file_loads_with_its_device_and_versions(path):
    # nothing in results/ is lost when code moves: each file still reads back as rows that say where they ran
    frame = load_results(path.stem)
    assert len(frame) > 0 and frame.recipe.notna().all() and frame.device.notna().all(), path.name
    assert all(isinstance(v, dict) and "torch" in v for v in frame.versions), path.name
