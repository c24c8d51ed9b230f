"""The shipped metric networks (data/metric_nets): checksums, loading as embedders, the copy detector's
separation of re-acquired copies from other patients, tau calibration, and the pipeline that trains them."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from fixtures_scripts import load_script
from memcontrol.data import describe_patient, patient_seeds
from memcontrol.data.cohorts import SEEDS
from memcontrol.data.phantoms import render_patients
from memcontrol.data.reacquire import reacquire
from memcontrol.errors import MissingWeightsError
from memcontrol.metrics import build_embedder
from memcontrol.metrics.memorization import calibrate_tau, tau_at_false_positive_rate

NETS = REPO / "data" / "metric_nets"


@pytest.mark.parametrize("kind", ["domain", "copy_detector"])
def test_shipped_network_matches_its_checksums_and_loads(kind):
    folder = NETS / kind
    entries = [line.split("  ", 1) for line in (folder / "CHECKSUMS.sha256").read_text().splitlines() if line]
    assert {name for _, name in entries} == {"config.json", "model.safetensors"}
    for digest, name in entries:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["kind"] == kind and "public" in provenance["data"]["cohort"]
    embedder = build_embedder({"type": "metric_net", "path": str(folder)})
    assert embedder.name == kind
    feats = embedder.embed(torch.rand(3, 3, 64, 64) * 2 - 1)
    assert feats.shape == (3, 64) and torch.isfinite(feats).all()


def test_a_missing_weight_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text((NETS / "domain" / "config.json").read_text())
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        build_embedder({"type": "metric_net", "path": str(tmp_path)})


def unseen_patients(site: str, count: int):
    """Patients no metric network trained or was evaluated on: public ones after every index the pipeline used,
    or held-out patients of the private site."""
    if site == "public":
        used = json.loads((NETS / "copy_detector" / "provenance.json").read_text())["data"]["evaluation_indices"][1]
        seeds = patient_seeds(SEEDS["public_chest"], used + count)[used:]
    else:
        seeds = patient_seeds(SEEDS["heldout_rendered"], count)
    return [describe_patient(s, site) for s in seeds]


def as_images(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).unsqueeze(1).expand(-1, 3, -1, -1) * 2 - 1


@pytest.mark.parametrize("site", ["public", "private"])
def test_copy_detector_matches_each_reacquired_patient_to_itself(site):
    patients = unseen_patients(site, 24)
    rng = np.random.default_rng(0)
    originals = as_images(render_patients(patients, 64))
    copies = as_images(render_patients([reacquire(p, rng) for p in patients], 64))
    detector = build_embedder({"type": "metric_net", "path": str(NETS / "copy_detector")})
    sim = F.normalize(detector.embed(copies), dim=1) @ F.normalize(detector.embed(originals), dim=1).T
    own = sim.diagonal()
    others = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), -1).max(1).values
    # Every copy is nearer its own patient than any other patient is, by a margin of 0.05 in cosine similarity:
    # wide enough that the identification is not a tie decided by rounding.
    assert (own - others).min() > 0.05, (own - others).min()


def test_tau_calibration_hits_its_false_positive_rate_on_fresh_data():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(50, 16, generator=gen)

    def heldout(n):
        return torch.randn(n, 16, generator=gen)

    tau, sims = calibrate_tau(heldout(2000), train, 0.05)
    # on the calibration set itself the rate is never exceeded (ties can only lower it)
    assert (sims > tau).mean() <= 0.05
    fresh = calibrate_tau(heldout(4000), train, 0.05)[1]
    # a fresh draw from the same patients' distribution: 5% within 1.5 points, about three standard errors of the
    # two binomial proportions (calibration set of 2,000 and test set of 4,000) combined
    assert abs((fresh > tau).mean() - 0.05) < 0.015
    assert tau_at_false_positive_rate([0.1, 0.9, 0.5], 0.0) == 0.9


def test_the_pipeline_trains_and_ships_both_networks(tmp_path):
    module = load_script("pipelines/train_metric_nets.py")
    assert module.main(["--out", str(tmp_path), "--patients", "12", "--eval-patients", "8", "--steps", "2",
                        "--batch-size", "8"]) == 0
    for kind in ("domain", "copy_detector"):
        provenance = json.loads((tmp_path / kind / "provenance.json").read_text())
        assert provenance["steps"] == 2 and provenance["data"]["training_indices"] == [0, 12]
        assert "measured_on_unseen_public" in provenance
        embedder = build_embedder({"type": "metric_net", "path": str(tmp_path / kind)})
        assert embedder.embed(torch.zeros(2, 3, 64, 64)).shape == (2, 64)


def test_the_generated_look_changes_the_share_of_views_it_is_given():
    module = load_script("pipelines/train_metric_nets.py")
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    untouched = module.generated_look(x, torch.Generator().manual_seed(1), share=0.0)
    assert torch.equal(untouched, x)
    looked = module.generated_look(x, torch.Generator().manual_seed(1), share=0.5)
    changed = (looked != x).flatten(1).any(1)
    assert 16 <= int(changed.sum()) <= 48  # about half of 64 (binomial: 4 standard deviations either side)
    assert looked.min() >= -1 and looked.max() <= 1
    # wider contrast than the shipped augmentation's 0.85-1.15: some views' spread about their mean at least 1.3x
    spread = looked[changed].flatten(1).std(1) / x[changed].flatten(1).std(1)
    assert float(spread.max()) > 1.3


def test_a_run_stopped_early_on_its_schedule_repeats_bit_for_bit(tmp_path):
    # What a time budget stopped on one machine, --stop-after repeats on another: the same steps of the same schedule.
    module = load_script("pipelines/train_metric_nets.py")
    tiny = ["--only", "copy_detector", "--patients", "12", "--eval-patients", "8", "--batch-size", "8", "--steps", "10"]
    sums = []
    for name, extra in (("a", ["--stop-after", "3"]), ("b", ["--stop-after", "3"]), ("full", [])):
        assert module.main(tiny + extra + ["--out", str(tmp_path / name)]) == 0
        provenance = json.loads((tmp_path / name / "copy_detector" / "provenance.json").read_text())
        assert provenance["schedule_steps"] == 10 and provenance["steps"] == (10 if name == "full" else 3)
        sums.append(hashlib.sha256((tmp_path / name / "copy_detector" / "model.safetensors").read_bytes()).digest())
    assert sums[0] == sums[1] != sums[2]
