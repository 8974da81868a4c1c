"""quantlab: the helper package behind the course on quantizing FLUX.1 with diffusers.

Notebooks import it as ``import quantlab as ql`` and call ``ql.models``, ``ql.recipes``,
``ql.measure``, ``ql.viz`` and ``ql.env``, and a module per topic (``ql.bnb``, ``ql.gguf``,
``ql.torchao``, ``ql.quanto``, ``ql.memory``, ``ql.speed`` (with its Triton kernel in ``ql.kernels``), ``ql.compare``, ``ql.plan``, ``ql.lowram``); the
most used functions are also here at the top.
"""

import importlib

from . import (bnb, compare, env, gguf, gguf_quants, kernels, measure, memory, models, plan, quanto, recipes, shapes,
               speed, torchao, viz)
from .env import report
from .models import ModelUnavailableError, get_model, list_models, model_path
from .recipes import UnsupportedHardwareError, check_runs_here, get_recipe, list_recipes, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "bench",
    "bnb",
    "colab",
    "compare",
    "course",
    "env",
    "gguf",
    "gguf_quants",
    "kernels",
    "lowram",
    "measure",
    "memory",
    "models",
    "plan",
    "quanto",
    "recipes",
    "shapes",
    "speed",
    "torchao",
    "train_mini",
    "viz",
    "report",
    "ModelUnavailableError",
    "UnsupportedHardwareError",
    "get_model",
    "list_models",
    "model_path",
    "check_runs_here",
    "get_recipe",
    "list_recipes",
    "load_pipeline",
]


def __getattr__(name: str):
    # `ql.bench`, `ql.colab`, `ql.course`, `ql.lowram` and `ql.train_mini` are command-line modules too (`python -m
    # quantlab.bench`), so they are imported on first use rather than with the package.
    if name in ("bench", "colab", "course", "lowram", "train_mini"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")
