"""The claim of a finished search (``memcontrol.search.claim``) on run folders whose truth is known: quality
features drawn around a reference Gaussian at set distances, copies set by the memorization samples' similarity."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from memcontrol.search.claim import compute
from memcontrol.search.results import Results, Row

D, N_QUALITY, N_MEM, TAU = 4, 96, 32, 0.7


def _run(root, name, kind, label, shift, copies, seed, **attrs):
    """A run folder: quality features ~ N(shift * e, I) against a N(0, I) reference (FD = D * shift^2), and
    ``copies`` of its memorization samples above tau."""
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    save_file({"features": (rng.normal(size=(N_QUALITY, D)) + shift).astype(np.float32)},
              str(folder / "quality_features.safetensors"))
    sims = [0.9] * copies + [0.3] * (N_MEM - copies)
    (folder / "neighbours.json").write_text(json.dumps([{"similarity": s} for s in sims]))
    return Row(kind=kind, number=seed, label=label, state="complete", memorization=0.5, quality=1.0, feasible=True,
               attrs={"folder": name, "trainable_percent": 1.0, **attrs})


@pytest.fixture
def study(tmp_path):
    settings = SimpleNamespace(out_dir=tmp_path, objectives={"memorization": {"tau": TAU}, "bootstrap_resamples": 500},
                               sampling={"seed": 0, "quality_prompts": N_QUALITY // 2, "per_prompt": 2})
    base = _run(tmp_path, "base", "base", "base model, not fine-tuned", 3.0, 0, 1, baseline="base_model")
    full = _run(tmp_path, "full", "baseline", "full fine-tuning", 0.3, 12, 2, baseline="full_ft")
    # Seen through the search's noise, then re-evaluated: the re-evaluation's figures are the claim's.
    trial = _run(tmp_path, "trial", "trial", "trial 0", 0.0, 0, 3)
    trial.chosen = True
    again = _run(tmp_path, "again", "reevaluation", "re-evaluated", 1.5, 0, 4)
    control = _run(tmp_path, "control", "control", "control: random mask 1", 1.5, 10, 5)
    twin = _run(tmp_path, "twin", "control", "control: LoRA on all attention", 1.5, 1, 6)
    results = Results([trial], [full], [trial], None, 1, base=base, reevaluation=again, controls=[control, twin])
    reference = np.random.default_rng(0).normal(size=(2000, D))
    return settings, results, reference


def test_recovery_and_cut_cover_their_true_values_from_the_reevaluation(study):
    settings, results, reference = study
    claim = compute(results, settings, reference, floor_features=np.random.default_rng(9).normal(size=(96, D)))
    # FD = D * shift^2: base 36, full 0.36, chosen (re-evaluated) 9. The search-time run (shift 0) is not used.
    assert claim.chosen_source == "re-evaluation on fresh seeds"
    truth = (36 - 9) / (36 - 0.36)
    assert claim.recovery.low <= truth <= claim.recovery.high
    assert claim.recovery.high < 0.95 and claim.recovery.low > 0.4
    assert claim.full_gap_closed.low <= (36 - 0.36) / 36 <= claim.full_gap_closed.high
    # 0 of 32 against 12 of 32: a 100% cut whose interval still reaches below 100%.
    assert claim.copy_cut.value == 1.0 and claim.copy_cut.low < 1.0
    assert claim.full.copy_rate.value == pytest.approx(12 / 32)


def test_verdicts_against_other_rows(study):
    settings, results, reference = study
    verdicts = {c.label: c for c in compute(results, settings, reference).comparisons}
    assert set(verdicts) == {"full fine-tuning", "control: random mask 1", "control: LoRA on all attention"}
    full = verdicts["full fine-tuning"]
    # Fewer copies (0 vs 12 of 32) but worse quality (FD 9 vs 0.36): not a win.
    assert full.verdict(full.copy_difference) == "better" and full.verdict(full.quality_difference) == "worse"
    assert not full.beats
    # Same quality distribution, 0 vs 10 copies: better on one objective, no different on the other.
    random_mask = verdicts["control: random mask 1"]
    assert random_mask.verdict(random_mask.quality_difference) == "no different" and random_mask.beats
    # Same quality, 0 vs 1 copy of 32: inside the noise on both: no win claimed.
    twin = verdicts["control: LoRA on all attention"]
    assert twin.verdict(twin.copy_difference) == "no different" and not twin.beats


def test_the_markdown_says_what_was_met(study):
    settings, results, reference = study
    text = compute(results, settings, reference).to_markdown()
    assert "quality gain recovered by the chosen candidate" in text and "NOT met" in text  # recovery ~0.76 < 0.8
    assert "re-evaluation on fresh seeds" in text and "does not beat it" in text and "beats it" in text
    assert "not its training seed" in text and "bench/seeds.py" in text  # what they leave out, and where to get it


def test_do_not_fine_tune_claims_nothing(study):
    settings, results, reference = study
    results.trials[0].chosen = False
    results.base.chosen = True
    claim = compute(results, settings, reference)
    assert claim.do_not_finetune and claim.recovery is None and claim.copy_cut is None and not claim.comparisons
    assert "do not fine-tune" in claim.to_markdown()


def test_a_run_sampled_from_fresh_seeds_shows_the_interval_its_metrics_have(study):
    # The re-evaluation samples from other seeds, and its metrics.json resamples from them: the claim's row shows
    # that same interval, so one run prints one interval. Rows of the search's own seeds keep the study's resamples.
    from safetensors.numpy import load_file

    from memcontrol.metrics.intervals import bootstrap_indices
    from memcontrol.metrics.quality import quality_report

    settings, results, reference = study
    results.reevaluation.attrs["sampling_seed"] = 2
    claim = compute(results, settings, reference)

    def as_metrics(folder, seed):
        features = load_file(str(settings.out_dir / folder / "quality_features.safetensors"))["features"]
        report = quality_report(reference, features, "test", 10, 50, seed, bootstrap_indices(N_QUALITY, 500, seed))
        return report["fd"], report["fd_ci_low"], report["fd_ci_high"]

    shown = {r.label: (r.quality.value, r.quality.low, r.quality.high) for r in claim.runs}
    assert shown[claim.chosen.label] == pytest.approx(as_metrics("again", 2), rel=1e-9)
    assert shown["full fine-tuning"] == pytest.approx(as_metrics("full", 0), rel=1e-9)
    assert shown[claim.chosen.label][1:] != pytest.approx(as_metrics("again", 0)[1:], rel=1e-9)  # the seed matters
