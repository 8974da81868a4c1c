"""Colab copies of the chapters: `make colab` writes `colab/NN_topic.ipynb` for every chapter in `notebooks/`.

    python -m quantlab.lab.colab [--out colab]

Each copy is the chapter with a Colab preamble and a last section added, all generated here, so nobody
edits `colab/` by hand (tests/test_lab_colab.py fails when it is out of date):

1. an Open-in-Colab badge, and a line saying where the copy comes from;
2. an install cell: the versions pinned in pyproject.toml, keeping Colab's own torch when it is recent
   enough (`keep_installed_torch`), then quantlab itself from a clone of the repository;
3. a GPU check, with what to do when the runtime has none;
4. a Hugging Face login for the gated FLUX.1-dev, falling back to FLUX.1-schnell, which sets `FULL_MODEL`;
5. the chapter's own cells, unchanged except the `parameters` cell, whose defaults suit a free T4
   (`T4_DEFAULTS`, and the size of the FLUX.1-dev image of step 6);
6. "FLUX.1-dev on this T4": the chapter's own backend on `FULL_MODEL` within a free Colab's 15 GiB of GPU
   memory and 11.8 GiB of host RAM: the low-RAM recipe's whole script as cells (`Recipe.code`), what it
   downloads, and whether it fitted the simulated T4 (results/09_colab_t4_sim_flux-dev-shaped.json).

The repository the badges and the install cell point at is `REPO`, and nowhere else.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import tomllib
from pathlib import Path

import nbformat

from .. import course, env, measure, plan, recipes
from . import t4_plan

__all__ = [
    "REPO",
    "BRANCH",
    "MIN_TORCH",
    "TORCH_BELOW",
    "TORCH_INDEX_URL",
    "T4_DEFAULTS",
    "CHAPTER_T4",
    "colab_url",
    "pinned_requirements",
    "keep_installed_torch",
    "t4_parameters",
    "colab_notebook",
    "readme",
    "write_colab",
    "main",
]

# The GitHub repository (owner/name) of this course: the badges, the links in colab/README.md and the
# install cell are all built from it. Change it here when the repository moves, then run `make colab`.
REPO = "quantlab-course/quantlab"
BRANCH = "main"

ROOT = course.REPO
PYPROJECT = ROOT / "pyproject.toml"
COLAB_DIR = ROOT / "colab"
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"

# The oldest torch that the pinned packages fully work with. torchao 0.18.0 loads its compiled kernels only
# with torch >= 2.11.0 (its __init__ skips them below that, "Please upgrade to torch >= 2.11.0"); the others
# ask less: diffusers 0.42.1, transformers 5.23.0 and optimum-quanto 0.2.7 torch >= 2.6, bitsandbytes 0.50.2
# torch >= 2.4, accelerate 1.15.0 torch >= 2.0. The committed GPU runs in results/ used torch 2.11.0.
MIN_TORCH = "2.11"
# bitsandbytes 0.50.2 asks for torch < 3.
TORCH_BELOW = "3"
# Where a too-old Colab torch is replaced from: PyTorch's CUDA 12.6 wheels, which run on a T4 (compute
# capability 7.5) with the CUDA 12 driver of a Colab runtime.
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu126"
# Unpinned dependencies of quantlab that a Colab runtime does not need: it has its own Jupyter, and the test
# tools are not used by the chapters.
NOT_ON_COLAB = ("jupyterlab", "ipykernel", "papermill", "pytest")
CHECKOUT = "/content/quantlab"

# What each chapter's copy runs at its end on FLUX.1-dev, and why: the chapter's own backend wherever one of
# its low-RAM recipes fits a T4, else the nearest that does.
CHAPTER_T4 = {
    "00_tour": (("nf4-encode-then-free",), "the tour's bf16 baseline needs 36 GiB of GPU memory and bf16, which a T4 "
                "lacks; NF4 with the prompt encoded first is the same pipeline made to fit"),
    "01_bitsandbytes": (("nf4-prequantized",), "the chapter's own backend, read pre-quantized: diffusers/FLUX.1-dev-"
                        "bnb-4bit's NF4 transformer is a smaller download than the bf16 one it is made from"),
    "02_gguf": (("gguf-q4_k-encode-then-free",), "the chapter's own backend: a public Q4_K file of the transformer"),
    "03_torchao": (("torchao-int8wo-encode-then-free",), "the chapter's own backend: int8 weight-only runs on a T4 "
                   "(the float8 configs need compute capability 8.9)"),
    "04_quanto": (("quanto-int8-encode-then-free",), "the chapter's own backend: Quanto int8, quantized while it "
                  "loads onto the GPU"),
    "05_memory": (("nf4-encode-then-free",), "offloading parks the components in host RAM (17 to 38 GiB while "
                  "generating, results/05), and fp8 layerwise casting loads the 23.8 GB transformer before it casts "
                  "it: neither fits 11.8 GiB of host RAM. Encoding the prompt first and freeing T5 is the memory "
                  "recipe that does"),
    "06_speed": (("nf4-encode-then-free",), "the chapter's fp8 and bf16 recipes need compute capability 8.9 and "
                 "8.0; a T4 (7.5) runs the NF4 pipeline in fp16"),
    "07_compare": (("nf4-encode-then-free", "torchao-int8wo-encode-then-free"),
                   "two backends that fit a T4 and 11.8 GiB of host RAM, side by side"),
    "08_newer": (("nf4-encode-then-free",), "the chapter's backends have not been run on a simulated T4 yet; NF4 with "
                 "the prompt encoded first is the recipe that was"),
}
T4_RESULTS = "09_colab_t4_sim_flux-dev-shaped"
# Defaults of the `parameters` cell on Colab. The walk-through runs on the trained mini model (its numbers
# and pictures are the chapter's); dtypes follow the GPU (`ql.env.default_dtype`: fp16 on a T4).
T4_DEFAULTS = {"MODEL": "mini"}
# Parameters added to every copy, for its last section: FLUX.1-dev at 512×512 takes about a quarter of
# the time of 1024×1024 on a T4 (4× fewer image tokens), and every Colab recipe was measured to fit it;
# 0 steps is 28 (what the recipes' code uses) or the model's own count if that is smaller (schnell: 4).
FULL_PARAMETERS = (
    ("FULL_HEIGHT", "512", ""),
    ("FULL_WIDTH", "512", ""),
    ("FULL_STEPS", "0", "0: 28 for FLUX.1-dev, as the recipes' code reads; schnell's own 4"),
)
DEV = "black-forest-labs/FLUX.1-dev"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
# Every generated cell carries this metadata key, whose value says which cell it is.
MARKER = "quantlab_colab"


def colab_url(name: str) -> str:
    """The Open-in-Colab address of `colab/<name>` (a notebook file name)."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/colab/{name}"


def _badge(name: str) -> str:
    return f"[![Open In Colab]({BADGE_SVG})]({colab_url(name)})"


def pinned_requirements(pyproject: str | Path = PYPROJECT) -> tuple[str, list[str], list[str]]:
    """(the torch pin, the other pins, the unpinned packages a Colab runtime needs) from pyproject.toml."""
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = [d for d in dependencies if "==" in d]
    torch_pins = [d for d in pins if d.split("==")[0].strip() == "torch"]
    if len(torch_pins) != 1:
        raise ValueError(f"{pyproject} must pin torch exactly once (torch==X.Y.Z); it has {torch_pins}.")
    unpinned = [d for d in dependencies if "==" not in d and d not in NOT_ON_COLAB]
    return torch_pins[0], [d for d in pins if d not in torch_pins], unpinned


def keep_installed_torch(installed: str | None, minimum: str, below: str) -> bool:
    """True when the installed torch (a version such as "2.9.0+cu126", or None) is >= minimum and < below."""
    if not installed:
        return False
    major_minor = [tuple(int(part) for part in v.split("+")[0].split(".")[:2]) for v in (minimum, installed, below)]
    return major_minor[0] <= major_minor[1] < major_minor[2]


def _cell(kind: str, source: str, role: str):
    make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
    cell = make(source.strip("\n"), id=f"colab-{role}")
    cell.metadata = {MARKER: role}
    return cell


def _badge_cell(name: str):
    return _cell("markdown", f"""
{_badge(name)}

This is the Colab copy of `notebooks/{name}`, generated from it by `make colab`: do not edit it, edit the
chapter and run `make colab`. The first cells set up Colab (install, GPU check, Hugging Face login); then
comes the chapter, on the small mini model; the last section runs the chapter's recipe on FLUX.1-dev
within a free T4's memory.
""", "badge")


def _install_source(pyproject: str | Path = PYPROJECT) -> str:
    torch_pin, pins, unpinned = pinned_requirements(pyproject)
    keep = inspect.getsource(keep_installed_torch).strip("\n")
    return f'''
# Colab setup: quantlab, and the versions the course pins in pyproject.toml (copied here by `make colab`).
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_URL = "https://github.com/{REPO}"
CHECKOUT = Path("{CHECKOUT}")  # the repository: quantlab, and the committed GPU results the chapters read
TORCH_PIN = "{torch_pin}"
PINS = {json.dumps(pins)}
ALSO_NEEDED = {json.dumps(unpinned)}  # unpinned; Colab usually has them already
# The oldest torch the pins work with: torchao {_pin_version(pins, "torchao")} loads its kernels only with torch >= 2.11
# (diffusers, transformers and optimum-quanto ask >= 2.6); bitsandbytes asks < 3.
MIN_TORCH = "{MIN_TORCH}"
TORCH_BELOW = "{TORCH_BELOW}"
TORCH_INDEX_URL = "{TORCH_INDEX_URL}"  # PyTorch's CUDA 12.6 wheels: they run on a T4


{keep}


def pip_install(*args):
    print("pip install", *args, flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *args])


if "google.colab" not in sys.modules:
    print("Not on Colab: nothing installed. On your own machine, `make setup` installs the same versions.")
else:
    try:
        installed = metadata.version("torch")  # read without importing torch, which may be replaced
    except metadata.PackageNotFoundError:
        installed = None
    replace_torch = not keep_installed_torch(installed, MIN_TORCH, TORCH_BELOW)
    if replace_torch:
        print(f"Colab's torch ({{installed or 'none'}}) is outside [{{MIN_TORCH}}, {{TORCH_BELOW}}), which the pinned "
              f"packages need. Installing {{TORCH_PIN}} and a torchvision built for it from {{TORCH_INDEX_URL}} "
              f"(a download of several GB). Then restart the session (Runtime > Restart session) and run this "
              f"cell again: it will keep that torch.")
        pip_install(TORCH_PIN, "torchvision", "--index-url", TORCH_INDEX_URL)
        pip_install(*PINS, *ALSO_NEEDED)
    else:
        print(f"Keeping Colab's torch {{installed}} (>= {{MIN_TORCH}}): no multi-GB download.")
        pip_install(f"torch=={{installed}}", *PINS, *ALSO_NEEDED)  # naming torch's version keeps pip off it
    if not CHECKOUT.exists():
        subprocess.check_call(["git", "clone", "--depth", "1", REPO_URL, str(CHECKOUT)])
    pip_install("--no-deps", "-e", str(CHECKOUT))
    sys.path.insert(0, str(CHECKOUT))  # importable now, without a restart
    if replace_torch:
        raise SystemExit("torch was replaced: Runtime > Restart session, then run the notebook from the top.")
    print("Done: quantlab and the pinned packages are installed.")
'''


def _pin_version(pins: list[str], package: str) -> str:
    return next((p.split("==")[1] for p in pins if p.split("==")[0] == package), "?")


def _install_cells(pyproject: str | Path = PYPROJECT) -> list:
    return [
        _cell("markdown", f"""
## Colab setup

The next cell installs quantlab and the package versions this course pins. Colab comes with its own
torch: if it is {MIN_TORCH} or newer (the oldest that the pinned torchao runs its kernels with), the cell keeps
it and installs everything else at its pinned version, so there is no multi-GB download. If it is older,
the cell says so, installs the pinned torch from PyTorch's CUDA 12.6 wheels, and asks you to restart the
session (Runtime > Restart session) and run it again. quantlab itself comes from a clone of
[{REPO}](https://github.com/{REPO}) in `{CHECKOUT}`,
which also holds the committed GPU results that the chapter reads.
""", "install-md"),
        _cell("code", _install_source(pyproject), "install"),
    ]


def _gpu_cells() -> list:
    return [
        _cell("markdown", """
Is there a GPU? A free Colab runtime has a T4: 15 GiB of GPU memory, compute capability 7.5, so fp16 but
neither bf16 (8.0 and newer) nor fp8 (8.9 and newer).
""", "gpu-md"),
        _cell("code", """
import torch

import quantlab as ql

if torch.cuda.is_available():
    gpu = ql.env.device_info("cuda")
    major, minor = gpu.compute_capability
    print(f"GPU: {gpu.name}, {gpu.total_memory_gib:.1f} GiB ({gpu.free_memory_gib:.1f} GiB free), "
          f"compute capability {major}.{minor}")
    if not gpu.bf16:
        print("No bf16 on this GPU (it needs compute capability 8.0; a T4 is 7.5): the chapters compute in fp16.")
    if not gpu.fp8:
        print("No fp8 on this GPU (it needs compute capability 8.9): recipes that need it are skipped, "
              "each with the reason.")
else:
    print("This runtime has no GPU. To get one: Runtime > Change runtime type > T4 GPU > Save, then run the "
          "notebook again from the top.\\nWithout a GPU the chapter still runs, on the CPU with the small mini "
          "model; only the last section (FLUX.1-dev on a T4) is skipped.")
""", "gpu"),
    ]


def _login_cells() -> list:
    return [
        _cell("markdown", f"""
## Hugging Face login

[FLUX.1-dev](https://huggingface.co/{DEV}) is gated: accept its licence on that page,
then give this notebook a token with read access, either as a Colab secret named `HF_TOKEN` (the key icon
on the left) or in the box the next cell shows. Without a token, the last section uses
[FLUX.1-schnell](https://huggingface.co/{SCHNELL}), which needs no login.
The chapter itself runs on the mini model and needs neither.
""", "login-md"),
        _cell("code", """
import sys

from huggingface_hub import get_token, notebook_login

if get_token():
    print("A Hugging Face token is set up.")
elif "google.colab" in sys.modules:
    notebook_login()  # shows a box for the token and returns at once: paste the token, then run the next cell
else:
    print("No Hugging Face token here (`hf auth login` sets one): the next cell falls back to FLUX.1-schnell.")
""", "login"),
        _cell("markdown", """
Which full-size model can this notebook download? FLUX.1-dev if the token opens it, else FLUX.1-schnell.
`ql.models.check_hub_access` asks the Hub before anything is downloaded, and says what is missing. If you
have just pasted a token into the box above, run this cell again.
""", "model-md"),
        _cell("code", f"""
FULL_MODEL = None  # the model of the last section
for candidate in ("{DEV}", "{SCHNELL}"):
    try:
        FULL_MODEL = ql.models.check_hub_access(ql.get_model(candidate))
        break
    except ql.ModelUnavailableError as error:
        print(f"{{candidate}} is not usable here: {{error}}\\n")
if FULL_MODEL is None:
    print("Neither model can be downloaded here, so the last section is skipped.")
else:
    print(f"FULL_MODEL = {{FULL_MODEL!r}}" + ("" if FULL_MODEL == "{DEV}" else " (the fallback: no login needed)"))
""", "model"),
    ]


def _environ_defaults(tree: ast.AST) -> dict[str, ast.Constant]:
    """NAME -> the default of each `os.environ.get("QUANTLAB_NAME", default)` in a parameters cell."""
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and ast.unparse(node.func.value) == "os.environ" and len(node.args) == 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
                and node.args[0].value.startswith("QUANTLAB_")):
            found[node.args[0].value.removeprefix("QUANTLAB_")] = node.args[1]
    return found


def t4_parameters(source: str) -> str:
    """A chapter's `parameters` cell with Colab's T4 defaults (`T4_DEFAULTS`) and the FULL_* parameters added."""
    defaults = _environ_defaults(ast.parse(source))
    missing = [name for name in T4_DEFAULTS if name not in defaults]
    if "MODEL" in missing:
        raise ValueError(f"The parameters cell has no QUANTLAB_MODEL default to rewrite:\n{source}")
    lines = source.splitlines()
    for name, value in T4_DEFAULTS.items():
        node = defaults.get(name)
        if node is None:
            continue
        if node.lineno != node.end_lineno:
            raise ValueError(f"The default of QUANTLAB_{name} spans several lines; keep it on one.")
        line = lines[node.lineno - 1]
        lines[node.lineno - 1] = line[:node.col_offset] + json.dumps(value) + line[node.end_col_offset:]
    changed = ", ".join(f"{name} {json.dumps(value)}" for name, value in T4_DEFAULTS.items() if name in defaults)
    header = f"# Colab: the defaults suit a free T4 ({changed}); the last section runs FLUX.1-dev."
    added = ["", "# Colab: the size and steps of the FLUX.1-dev image of the last section"]
    for name, value, comment in FULL_PARAMETERS:
        line = f'{name} = int(os.environ.get("QUANTLAB_{name}", "{value}"))'
        added.append(f"{line}  # {comment}" if comment else line)
    return "\n".join([header, *lines, *added])


def _download_gb(recipe: recipes.Recipe) -> float:
    """What a low-RAM recipe downloads from the Hub, in GB: the components it loads, as stored there."""
    bf16 = plan.weights_bytes("black-forest-labs/FLUX.1-dev", "bf16")
    stored = {**bf16}
    if recipe.low_ram.prequantized or recipe.gguf_type:
        stored["transformer"] = plan.weights_bytes("black-forest-labs/FLUX.1-dev", recipe)["transformer"]
    return sum(stored.values()) / 1e9


def t4_verdict(name: str, results: str = T4_RESULTS) -> str:
    """One sentence: how recipe `name` did on the simulated T4 (its latest row in `results`), or that it has no row."""
    path = measure.results_dir() / f"{results}.json"
    rows = [r for r in measure.load_rows(path) if r.recipe == name and not r.extra.get("superseded")] if path.exists() else []
    if not rows:
        verdict = t4_plan.plan_colab("flux-dev-shaped", name)
        return (f"not measured on the simulated T4 yet; the planner predicts {verdict.peak_gpu_gib:.1f} GiB of GPU "
                f"memory and {verdict.peak_host_anon_gib:.1f} GiB of host RAM: "
                + ("it should fit." if verdict.fits else "it should not fit."))
    row = rows[-1]
    extra = row.extra
    size = f"{row.height}×{row.width}, {row.steps} steps, {row.date}"
    figures = (f"peak GPU memory {row.peak_gpu_mem_gib:.1f} of {extra.get('vram_cap_gib') or env.COLAB_T4_GPU_GIB:g} "
               f"GiB, host RAM {extra['peak_host_anon_gib']:.1f} GiB anonymous (VmRSS {row.peak_host_rss_gib:.1f})"
               if row.peak_gpu_mem_gib is not None and extra.get("peak_host_anon_gib") is not None else "")
    if extra.get("passed"):
        return f"fitted the simulated T4 ({size}): {figures}."
    return f"did not fit the simulated T4 ({size}): {extra.get('error') or figures}."[:400]


def _t4_cells(stem: str, parameter_names: set[str]) -> list:
    names, reason = CHAPTER_T4.get(stem, CHAPTER_T4["00_tour"])
    seed = "SEED" if "SEED" in parameter_names else "0"
    lines = []
    for name in names:
        recipe = recipes.get_recipe(name)
        lines.append(f"- `{name}`: {recipe.description}. It downloads about {_download_gb(recipe):.1f} GB, and "
                     f"{t4_verdict(name)}")
    cells = [
        _cell("markdown", f"""
## FLUX.1-dev on this T4

The walk-through above ran on the mini model. Here this chapter's backend runs on the real weights
(`FULL_MODEL`: FLUX.1-dev, or FLUX.1-schnell without a login) within a free Colab runtime:
{env.COLAB_T4_GPU_GIB:g} GiB of GPU memory and {env.COLAB_HOST_RAM_GIB:g} GiB of host RAM, in fp16. Loading is what
usually crashes FLUX on Colab: the host RAM runs out before anything reaches the GPU. So every weight goes
straight to the GPU (`device_map="cuda"`), the transformer is quantized while it loads, and the prompt is
encoded first, so that T5 is freed before the transformer arrives. Why this recipe here: {reason}.

{chr(10).join(lines)}

The cells below are the recipe's whole script, one stage a cell, as you would paste it into your own file.
""", "t4-md"),
        _cell("code", """
T4_READY = torch.cuda.is_available() and FULL_MODEL is not None
if not torch.cuda.is_available():
    print("Skipped: this runtime has no CUDA GPU (Runtime > Change runtime type > T4 GPU).")
elif FULL_MODEL is None:
    print("Skipped: neither FLUX.1-dev nor FLUX.1-schnell can be downloaded here (see the login cell at the top).")
else:
    print(ql.env.device_info("cuda").label, "with", FULL_MODEL)
""", "t4-check-gpu"),
    ]
    for name in names:
        recipe = recipes.get_recipe(name)
        settings = {**dict(recipe.script_settings)}
        settings_source = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
        cells.append(_cell("markdown", f"### `{name}`\n\nIts settings: this runtime's model, size and steps, in fp16.",
                           f"t4-{name}-md"))
        cells.append(_cell("code", f"""
assert T4_READY, "the cells of this section need a CUDA GPU and a model to download; see the cell above"
MODEL_ID = FULL_MODEL
PROMPT = ql.get_model(FULL_MODEL).prompt  # the chapter's PROMPT may be a caption the mini model was trained on
HEIGHT, WIDTH, SEED = FULL_HEIGHT, FULL_WIDTH, {seed}
STEPS = FULL_STEPS or min(28, ql.get_model(FULL_MODEL).steps)  # 28 for FLUX.1-dev, 4 for schnell
GUIDANCE = ql.get_model(FULL_MODEL).guidance_scale
MAX_SEQUENCE_LENGTH = ql.get_model(FULL_MODEL).max_sequence_length  # T5's prompt length: 512 for FLUX.1-dev
DEVICE, DTYPE = "cuda", torch.float16  # a T4 computes in fp16: no bf16, no fp8
{settings_source}
torch.cuda.reset_peak_memory_stats()
""", f"t4-{name}-settings"))
        for number, part in enumerate(recipe.script, 1):  # cell ids: letters, digits, "-" and "_", at most 64
            cells.append(_cell("code", (recipes.SCRIPTS_DIR / part).read_text(), f"t4-{name}-part{number}"))
        cells.append(_cell("code", f"""
host_anon_gib = ql.measure.read_status_kib("RssAnon").get("RssAnon", 0) / 2**20
print(f"{name}: peak GPU memory {{torch.cuda.max_memory_reserved() / 2**30:.1f}} of {env.COLAB_T4_GPU_GIB:g} GiB; "
      f"host RAM now {{host_anon_gib:.1f}} GiB anonymous, of {env.COLAB_HOST_RAM_GIB:g}")
assert torch.cuda.max_memory_reserved() / 2**30 <= {env.COLAB_T4_GPU_GIB:g}
image
""", f"t4-{name}-result"))
        cells.append(_cell("code", """
import gc

del pipe  # the next recipe starts from an empty GPU
gc.collect()
torch.cuda.empty_cache()
""", f"t4-{name}-free"))
    return cells


def colab_notebook(path: str | Path, pyproject: str | Path = PYPROJECT):
    """The Colab copy of the chapter at `path`, as a notebook (not written)."""
    path = Path(path)
    chapter = nbformat.read(path, as_version=4)
    tagged = [c for c in chapter.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path.name} needs exactly one cell tagged 'parameters'; it has {len(tagged)}.")
    parameter_names = set(_environ_defaults(ast.parse(tagged[0].source)))
    cells = [_badge_cell(path.name), *_install_cells(pyproject), *_gpu_cells(), *_login_cells()]
    for cell in chapter.cells:
        cell = nbformat.from_dict(json.loads(json.dumps(cell)))  # a copy
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if "parameters" in cell.metadata.get("tags", []):
                cell.source = t4_parameters(cell.source)
        cells.append(cell)
    cells += _t4_cells(path.stem, parameter_names)
    metadata = json.loads(json.dumps(chapter.metadata))
    metadata["accelerator"] = "GPU"  # Colab opens it on a GPU runtime
    metadata["colab"] = {"gpuType": "T4", "provenance": []}
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata, nbformat_minor=chapter.nbformat_minor)


def _title(path: Path) -> str:
    first = nbformat.read(path, as_version=4).cells[0].source.splitlines()[0]
    return first.lstrip("#").strip()


def readme(paths: list[Path]) -> str:
    """colab/README.md: what the copies are, and an Open-in-Colab link for each."""
    rows = "\n".join(f"| [`{p.name}`](../notebooks/{p.name}) | {_title(p)} | {_badge(p.name)} |" for p in paths)
    return f"""# colab/

Colab copies of the chapters in `notebooks/`, generated by `make colab` (`python -m quantlab.lab.colab`).
Do not edit them: edit the chapter, then run `make colab`. `tests/test_lab_colab.py` fails when a copy is out of date.

| chapter | topic | open |
|---|---|---|
{rows}

## What a copy adds to its chapter

1. The Open-in-Colab badge.
2. An install cell. It installs the versions pinned in `pyproject.toml` (copied in by `make colab`) and
   keeps Colab's preinstalled torch when it is {MIN_TORCH} or newer (and older than {TORCH_BELOW}):
   torchao {_pin_version(pinned_requirements()[1], "torchao")} loads its compiled kernels only with torch >= 2.11,
   and the other pins ask less. Any other torch is replaced by the pinned one from
   `{TORCH_INDEX_URL}`, after which the session must be restarted (Runtime > Restart session).
   quantlab comes from a shallow clone of the repository in `{CHECKOUT}` (installed with `--no-deps`),
   which also holds the committed GPU results the chapters read.
3. A GPU check: the GPU's name, memory and compute capability, and that a T4 (7.5) has neither bf16 nor
   fp8; with no GPU, how to get one (Runtime > Change runtime type > T4 GPU), and that the chapter still
   runs on the CPU.
4. A Hugging Face login for the gated FLUX.1-dev (a Colab secret `HF_TOKEN`, or `notebook_login`), which
   sets `FULL_MODEL` to FLUX.1-dev, or to FLUX.1-schnell (no login needed) when the token does not open it.
5. The chapter, unchanged except its `parameters` cell: `MODEL` defaults to `"mini"` (still read from
   `QUANTLAB_MODEL`, so papermill works), dtypes follow the GPU (fp16 on a T4), and `FULL_HEIGHT`,
   `FULL_WIDTH` (512) and `FULL_STEPS` (0: 28 for FLUX.1-dev, 4 for schnell) set the last section's image.
6. "FLUX.1-dev on this T4": the chapter's own backend on `FULL_MODEL` (`CHAPTER_T4` in
   `quantlab/lab/colab.py` says which recipe and why): what it downloads, whether it fitted the simulated T4
   (results/09_colab_t4_sim_flux-dev-shaped.json), then its whole script as cells, one stage a cell, the
   same code `ql.get_recipe(name).code()` returns; the peak GPU memory and host RAM are printed against a
   free T4's {env.COLAB_T4_GPU_GIB:g} GiB and {env.COLAB_HOST_RAM_GIB:g} GiB. Without a CUDA GPU the section stops
   at its first cell, saying why.

## The repository

The badges, these links and the install cell point at `github.com/{REPO}`,
branch `{BRANCH}`: the constants `REPO` and `BRANCH` in `quantlab/lab/colab.py`. When the repository
moves, change them there and run `make colab`.
"""


def write_colab(out_dir: str | Path = COLAB_DIR, notebooks: list[Path] | None = None,
                pyproject: str | Path = PYPROJECT) -> list[Path]:
    """Write the Colab copy of every chapter and the README into `out_dir`; remove copies of chapters gone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = course.notebook_paths() if notebooks is None else list(notebooks)
    written = []
    for path in paths:
        target = out_dir / path.name
        nbformat.write(colab_notebook(path, pyproject), target)
        written.append(target)
    for stale in sorted(set(out_dir.glob("*.ipynb")) - set(written)):
        stale.unlink()
    (out_dir / "README.md").write_text(readme(paths))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate colab/ from notebooks/."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(COLAB_DIR), help="where to write the copies (default: colab/)")
    args = parser.parse_args(argv)
    written = write_colab(args.out)
    print(f"wrote {len(written)} Colab notebooks and README.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
