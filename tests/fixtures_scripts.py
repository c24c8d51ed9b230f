"""The project's bench and pipeline scripts (``bench/*.py``, ``pipelines/*.py``) loaded as modules, so that tests call
their functions: they are scripts, not packages, and add their own folder to ``sys.path`` when run."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def load_script(relative: str):
    """The script at ``relative`` (from the repository root, e.g. ``"bench/truth.py"``), executed as a fresh module."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
