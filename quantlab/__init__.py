"""quantlab: the helper library behind the course on quantizing FLUX.1 with diffusers.

Chapters import it as ``import quantlab as ql``. The core: ``ql.models`` (what loads), ``ql.recipes`` (one
registry of named recipes, each checked against the hardware), ``ql.measure`` (memory, time, rows),
``ql.quality`` (error and prompt accuracy), ``ql.viz``, ``ql.env`` (the machine) and ``ql.pipeline``
(loading a recipe and running it). Then one module per topic: ``ql.bnb``, ``ql.gguf`` (with its block
quantizers in ``ql.gguf_quants``), ``ql.torchao``, ``ql.quanto``, ``ql.memory``, ``ql.speed``,
``ql.compare``, ``ql.plan``, ``ql.newer`` (chapter 08's backends) and ``ql.shapes``. The lab that makes
``results/`` is ``quantlab.lab``; chapters never import it.
"""

from . import env as _env

_env.quiet_import_notices()  # before any library is imported: see env.KNOWN_IMPORT_NOTICES

from . import (bnb, compare, env, files, gguf, gguf_quants, measure, memory, models, newer, pipeline, plan,
               quality, quanto, recipes, shapes, speed, torchao, viz)
from .env import UnsupportedHardwareError, report
from .models import ModelUnavailableError, get_model, list_models, model_path
from .pipeline import load_pipeline, run_recipe
from .recipes import get_recipe, list_recipes

__version__ = "0.1.0"

__all__ = [
    "bnb",
    "compare",
    "env",
    "files",
    "gguf",
    "gguf_quants",
    "measure",
    "memory",
    "models",
    "newer",
    "pipeline",
    "plan",
    "quality",
    "quanto",
    "recipes",
    "shapes",
    "speed",
    "torchao",
    "viz",
    "report",
    "ModelUnavailableError",
    "UnsupportedHardwareError",
    "get_model",
    "list_models",
    "model_path",
    "get_recipe",
    "list_recipes",
    "load_pipeline",
    "run_recipe",
]
