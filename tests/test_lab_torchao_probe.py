"""quantlab.lab.torchao_probe: the config list and the crash-proof worker."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

import quantlab as ql
from quantlab.lab import torchao_probe as qt


@pytest.fixture(scope="module")
def fixed_inputs(tiny_pipe):
    call = {**ql.get_model("tiny").call_kwargs(), "num_inference_steps": 2}
    inputs = ql.quality.capture_transformer_inputs(tiny_pipe, "a red circle", call)
    with torch.no_grad():
        reference = tiny_pipe.transformer(**inputs)[0]
    return inputs, reference


def test_installed_configs_lists_the_linear_configs():
    installed = set(qt.installed_configs())
    for name in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Int4WeightOnlyConfig",
                 "Float8WeightOnlyConfig", "Float8DynamicActivationFloat8WeightConfig"):
        assert name in installed
    probed = {c.name.split("(")[0] for c in qt.LINEAR_CONFIGS}
    assert installed - probed == {"AOPerModuleConfig", "FqnToConfig", "ModuleFqnToConfig",
                                  "intx_quantization_aware_training"}  # tools around configs, not Linear schemes


def test_every_listed_config_builds_a_torchao_config():
    from torchao.core.config import AOBaseConfig

    for config in qt.LINEAR_CONFIGS:
        assert isinstance(config.build(), AOBaseConfig), config.name
    assert len({c.name for c in qt.LINEAR_CONFIGS}) == len(qt.LINEAR_CONFIGS)


def test_probe_measures_what_runs_and_says_why_the_rest_does_not(tiny_path, fixed_inputs):
    inputs, reference = fixed_inputs
    rows = qt.probe_configs(["Int8WeightOnlyConfig()", "Float8DynamicActivationFloat8WeightConfig(PerRow())"],
                            tiny_path, inputs, reference, repeats=1)
    int8, fp8 = rows
    assert int8["status"] == "ran" and int8["quantized_linears"] == 62 and int8["weight_type"] == "Int8Tensor"
    assert int8["quantized_linear_bytes"] / int8["bf16_linear_bytes"] == pytest.approx(0.5, rel=0.05)
    assert int8["sqnr_db"] > 25 and int8["forward_ms"] > 0
    assert fp8["status"] == "failed" and "8.9" in fp8["why"]


def test_a_crashed_worker_is_reported_and_restarted_for_the_rest(tiny_path, fixed_inputs, monkeypatch):
    inputs, reference = fixed_inputs
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if len(calls) == 1:  # the first worker finishes A, starts B and dies
            stdout = ('{"config": "A", "status": "started"}\n{"config": "A", "status": "ran", "sqnr_db": 30}\n'
                      '{"config": "B", "status": "started"}\n')
            return subprocess.CompletedProcess(command, -11, stdout, "")
        stdout = '{"config": "C", "status": "started"}\n{"config": "C", "status": "failed", "why": "no kernel"}\n'
        return subprocess.CompletedProcess(command, 0, stdout, "")

    monkeypatch.setattr(qt.subprocess, "run", fake_run)
    rows = qt.probe_configs(["A", "B", "C"], tiny_path, inputs, reference)
    assert [r["status"] for r in rows] == ["ran", "crashed", "failed"]
    assert rows[1]["why"] == "the process died: signal 11 (SIGSEGV)"
    assert len(calls) == 2


def test_the_command_line_refuses_an_unknown_config_before_loading(capsys):
    with pytest.raises(SystemExit):
        qt.main(["NoSuchConfig()"])
    assert "unknown config(s) ['NoSuchConfig()']" in capsys.readouterr().err
