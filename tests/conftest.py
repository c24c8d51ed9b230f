"""Test session set-up: nothing is written outside the run, nothing is downloaded.

The environment is set at import time, before any test module imports torch, diffusers or matplotlib, since those
read their cache folders when first imported.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="memcontrol-tests-"))
# Every pytest process (each xdist worker too) makes its own; gone when that process ends.
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
for _var, _sub in {"HOME": "home", "TORCH_HOME": "torch", "HF_HOME": "hf", "MPLCONFIGDIR": "mpl",
                   "XDG_CACHE_HOME": "cache"}.items():
    (_SANDBOX / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_var] = str(_SANDBOX / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["MPLBACKEND"] = "Agg"
os.environ.setdefault("TQDM_DISABLE", "1")
# pytest-xdist runs the suite in one process per core (addopts in pyproject.toml): each gets its share of the cores,
# since processes whose thread pools together exceed the cores spin waiting on each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))

import pytest  # noqa: E402

# Each area keeps its shared fixtures in its own module, so that parallel work never edits this file.
pytest_plugins = ["fixtures_data", "fixtures_masks", "fixtures_metrics", "fixtures_search"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sandbox() -> Path:
    return _SANDBOX


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline saved as a diffusers folder, shared by the session."""
    from memcontrol.models import save_pipeline, tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-pipe")
    pipe = tiny_pipeline(seed=0, tokenizer_dir=root / "tok-src")
    return save_pipeline(pipe, root / "pipe")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipe_dir):
    """The tiny pipeline, loaded once. Tests that change weights must work on a copy (``copy.deepcopy``)."""
    from memcontrol.models import load_pipeline

    return load_pipeline(tiny_pipe_dir)


# The modules that take minutes, started first: pytest-xdist hands modules to its processes in collection order, and a
# long module started last would leave the other processes idle at the end.
_LONGEST_FIRST = ("test_metrics_known_truth.py", "test_search_scale.py", "test_privacy_jobs.py", "test_search_run.py",
                  "test_hospital_gap.py", "test_quickstart.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the others is kept
