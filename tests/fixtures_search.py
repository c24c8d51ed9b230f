"""Shared test fixtures of the search area (registered in conftest.py)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL_FILE = REPO / ".ci" / "postgres.url"


def _server_url() -> str | None:
    url = os.environ.get("MEMCONTROL_TEST_POSTGRES")
    if not url and POSTGRES_URL_FILE.is_file():
        url = POSTGRES_URL_FILE.read_text().strip()
    return url or None


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database on the CI server (``.ci/start_postgres.sh``), dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[dev]')")
    url = _server_url()
    if url is None:
        pytest.skip("no PostgreSQL server: set MEMCONTROL_TEST_POSTGRES or run .ci/start_postgres.sh "
                    f"(which writes {POSTGRES_URL_FILE})")
    try:
        admin = psycopg2.connect(url, connect_timeout=5)
    except psycopg2.OperationalError as err:
        pytest.skip(f"PostgreSQL server at {url} does not answer ({str(err).strip()}); "
                    "start it with .ci/start_postgres.sh")
    admin.autocommit = True
    name = f"memcontrol_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = url.rpartition("/")
    yield f"{base}/{name}"
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(scope="session")
def search_data(tmp_path_factory) -> dict:
    """A tiny private cohort (6 phantom patients, one of them twice) and 4 held-out patients, as DICOM files."""
    from memcontrol.data import make_phantoms

    root = tmp_path_factory.mktemp("search-data")
    return {"train": make_phantoms(root / "train", patients=6, seed=11, duplicates=1, size=64),
            "heldout": make_phantoms(root / "heldout", patients=4, seed=12, size=64)}


def cheap_search_config(pipe_dir, data: dict, **sections) -> dict:
    """The cheapest meaningful search: the tiny model, 64 px phantoms, 4 training steps, 2 + 2 samples of 2 steps,
    pixel features, no baselines, early stopping, re-evaluation or controls unless a test asks. ``sections``
    override whole keys of a section (``search={"n_trials": 5}``). Selection by the margin rule: on a random tiny
    model the qualities of the base model and the trials differ by noise, so the default rule would choose between
    exporting an adapter and "do not fine-tune" by chance (``test_search_claim`` runs that rule)."""
    cfg = {
        "model": {"path": str(pipe_dir), "device": "cpu"},
        "data": {"train": {"source": str(data["train"])}, "heldout": {"source": str(data["heldout"])},
                 "resolution": 64},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "seed": 0},
        "space": {"granularity": "block", "kinds": ["attention"], "family": "lora",
                  "family_params": {"lora": {"rank": 2, "alpha": 2}},
                  "train": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
        "objectives": {"memorization": {"metric": "mean_similarity", "features": {"type": "pixels", "size": 16}},
                       "quality": {"metric": "fd", "features": {"type": "pixels", "size": 4}}},
        "sampling": {"prompts": 2, "quality_prompts": 2, "per_prompt": 1, "steps": 2, "guidance_scale": 2.0},
        "early_stop": {"enabled": False},
        "search": {"n_trials": 3, "sampler": "random", "heartbeat_s": 1, "grace_s": 5},
        "baselines": {"enabled": False},
        "selection": {"rule": "margin", "reevaluate": False},
        "controls": {"enabled": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
