"""Shared fixtures: a private model cache for the test session, the tiny pipeline loaded once, and the
speed tests' stand-ins for optional packages (FA3, Triton) and diffusers' attention default."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Build embedded models into a fresh folder, so the tests prove that a build from nothing works."""
    previous = os.environ.get("QUANTLAB_CACHE")
    os.environ["QUANTLAB_CACHE"] = str(tmp_path_factory.mktemp("quantlab-cache"))
    yield
    if previous is None:
        os.environ.pop("QUANTLAB_CACHE", None)
    else:
        os.environ["QUANTLAB_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_path(private_cache) -> str:
    """The tiny model's folder, built once per session."""
    import quantlab as ql

    return ql.model_path("tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_path):
    """The tiny FluxPipeline in bf16 on the CPU, loaded once per session. Do not modify it."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the speed tests (tests/test_speed.py, tests/test_lab_speed.py) ---


@pytest.fixture
def module_problems(monkeypatch):
    """What `env._module_problem` says of each module the checks import (FA3's and Triton's): that each loads,
    unless a test puts a problem in the dict it returns."""
    problems: dict[str, str] = {}
    monkeypatch.setattr("quantlab.env._module_problem", lambda module: problems.get(module))
    return problems


@pytest.fixture
def fa3_installed(module_problems):
    """Pretend the fa3-fwd package is installed and loads (it loads only where a CUDA 13 runtime is)."""
    return module_problems


@pytest.fixture
def triton_installed(module_problems):
    """Pretend Triton is installed (PyTorch's CUDA builds bring it)."""
    return module_problems


@pytest.fixture
def fa3_missing(module_problems):
    module_problems["fa3_fwd_interface"] = "not installed here"
    return module_problems


@pytest.fixture
def keep_the_default_attention_backend():
    """`set_attention_backend` also sets diffusers' process-wide default: put it back after each test."""
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("native"):
        yield
