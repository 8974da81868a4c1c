"""Shared fixtures: a private model cache for the test session, and the tiny pipeline loaded once."""

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
