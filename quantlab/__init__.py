"""quantlab: the helper package behind the course on quantizing FLUX.1 with diffusers.

Notebooks import it as ``import quantlab as ql`` and call ``ql.models``, ``ql.recipes``,
``ql.measure``, ``ql.viz`` and ``ql.env``; the most used functions are also here at the top.
"""

from . import bench, env, measure, models, recipes, viz
from .env import report
from .models import ModelUnavailableError, get_model, list_models, model_path
from .recipes import UnsupportedHardwareError, check_runs_here, get_recipe, list_recipes, load_pipeline

__version__ = "0.1.0"

__all__ = [
    "bench",
    "env",
    "measure",
    "models",
    "recipes",
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
