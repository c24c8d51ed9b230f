"""The main job scaled down: `configs/quickstart.yaml` on the shipped base model and the bundled synthetic hospital,
with two trials of a few steps, through the command line, then the benchmark's reading of the run."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_scripts import load_script
from fixtures_search import write_config
from memcontrol.cli import main
from memcontrol.config import load_config

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO / "data" / "base_model"
HOSPITAL = REPO / "data" / "hospital"
NETS = REPO / "data" / "metric_nets"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not (BASE_MODEL / "model_index.json").is_file():
        pytest.skip(f"the bundled base model is missing: {BASE_MODEL / 'model_index.json'}")
    root = tmp_path_factory.mktemp("quickstart")
    # The preset as it ships, with only its size cut down (and absolute paths, as this file lives elsewhere).
    config = write_config(root / "quick.yaml", {
        "base": str(REPO / "configs" / "quickstart.yaml"),
        "model": {"path": str(BASE_MODEL), "device": "cpu"},
        "data": {"train": {"source": str(HOSPITAL / "private" / "manifest.csv")},
                 "heldout": {"source": str(HOSPITAL / "heldout" / "manifest.csv")}},
        "objectives": {"memorization": {"features": {"type": "metric_net", "path": str(NETS / "copy_detector")}},
                       "quality": {"features": {"type": "metric_net", "path": str(NETS / "domain")}}},
        "train": {"steps": 4, "warmup": 1},
        "sampling": {"prompts": 3, "quality_prompts": 3, "per_prompt": 1, "steps": 2},
        "early_stop": {"every": 2},
        "search": {"n_trials": 2, "workers": 1},
        "controls": {"random_masks": 1},
    })
    out = root / "run"
    assert main(["search", "--config", str(config), "--out", str(out)]) == 0
    return {"config": config, "out": out}


def test_the_scaled_down_main_job_writes_report_front_and_table(quick_run, capsys):
    out = quick_run["out"]
    rows = list(csv.DictReader(open(out / "trials.csv", encoding="utf-8")))
    # The quickstart compares with full fine-tuning only; configs/paper.yaml adds the other rows.
    assert [r["label"] for r in rows if r["kind"] == "baseline"] == ["full fine-tuning"]
    for r in rows:
        if r["state"] == "complete":
            assert float(r["fd"]) >= 0 and r["kid"] != "" and 0 <= float(r["copy_fraction"]) <= 1
    assert (out / "pareto.csv").is_file() and (out / "pareto_front.png").is_file()
    report = (out / "report.html").read_text()
    assert "Pareto front" in report and "full fine-tuning" in report


def test_the_exported_adapter_loads_in_a_fresh_diffusers_pipeline(quick_run):
    from diffusers import StableDiffusionPipeline

    best = quick_run["out"] / "best"
    selection = json.loads((best / "selection.json").read_text())
    if selection["do_not_finetune"]:
        # A few training steps may not beat the base model beyond noise: then nothing is exported, and the
        # adapters of the Pareto trials, in the same format, are what can be loaded.
        assert "Do not fine-tune" in (best / "README.txt").read_text()
        assert not (best / "pytorch_lora_weights.safetensors").exists()
        best = quick_run["out"] / "trials" / str(selection["pareto_front"][0]) / "adapter"
    else:
        assert selection["trial"] is not None
    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_MODEL), safety_checker=None,
                                                   requires_safety_checker=False)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    text = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        before = pipe.unet(x, t, text).sample
        pipe.load_lora_weights(str(best))
        after = pipe.unet(x, t, text).sample
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_the_benchmark_prints_the_claim_and_scores_the_run_against_the_truth(quick_run):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "quickstart.py"), "--config",
                           str(quick_run["config"]), "--run", str(quick_run["out"]), "--others", "200"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    claim = json.loads((quick_run["out"] / "claim.json").read_text())
    # The claim's table: every run of the study with its copy rate and quality, each with its interval.
    lines = out.split("| run | copy rate |")[1].splitlines()[2:]
    runs = lines[:next(i for i, line in enumerate(lines) if not line.startswith("| "))]
    assert len(runs) == len(claim["runs"]) >= 2
    assert runs[0].startswith("| base model, not fine-tuned | 0/") and all(r.count(" [") >= 2 for r in runs)
    for what in ("full fine-tuning's copy rate", "quality gain recovered", "copy rate cut",
                 "of the base model's quality gap to real held-out images"):
        assert what in out
    # Then the truth, for every evaluated run: trials, baselines, the base model, the re-evaluation, controls.
    folders = set()
    for name in ("trials.csv", "controls.csv"):
        if (quick_run["out"] / name).is_file():
            folders |= {r["folder"] for r in csv.DictReader(open(quick_run["out"] / name)) if r["state"] == "complete"}
    assert f"pooled over {len(folders)} evaluated runs" in out and "chance rate" in out
    assert "all runs: right detections" in out and "wrong detections" in out
    assert "name the patient whose report prompted the sample" in out


def test_the_seeds_benchmark_sets_studies_side_by_side(quick_run, tmp_path):
    # Two copies of one study's claim, the second with full fine-tuning's quality moved beyond its interval.
    claim = json.loads((quick_run["out"] / "claim.json").read_text())
    moved = json.loads(json.dumps(claim))
    full = next(r for r in moved["runs"] if r["label"] == "full fine-tuning")
    width = full["quality"]["high"] - full["quality"]["low"]
    full["quality"] = {k: v + 2 * width for k, v in full["quality"].items()}
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "claim.json").write_text(json.dumps(moved))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "seeds.py"), str(quick_run["out"]),
                           str(tmp_path / "seed1")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    side_by_side, over = done.stdout.split("Over the 2 studies")
    rows = {line.split(" | ")[0][2:]: line for line in side_by_side.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"base model, not fine-tuned", "full fine-tuning"}
    assert len(rows) == len(claim["runs"]) + 1  # every row of the study, and the header
    assert rows["base model, not fine-tuned"].count("| yes |") == 2
    assert rows["full fine-tuning"].endswith("| no |")  # quality apart, copy rate the same
    assert done.stdout.count("quality gain recovered by the chosen candidate") == 2
    # Then over the two studies: the base model agrees with itself; full fine-tuning's mean lies between the two.
    base = next(line for line in over.splitlines() if line.startswith("| base model, not fine-tuned |"))
    assert base.count("(same in every study)") == 2
    mean = float(next(line for line in over.splitlines()
                      if line.startswith("| full fine-tuning |")).split(" | ")[2].split(" [")[0])
    original = next(r for r in claim["runs"] if r["label"] == "full fine-tuning")["quality"]["value"]
    assert mean == pytest.approx(original + width, rel=1e-2)


def test_the_seeds_benchmark_compares_the_chosen_candidate_over_training_seeds():
    # Three hand-made studies: the chosen candidate copies less than full fine-tuning in each and is about as good;
    # its two random masks are, on average, the same as it.
    bench = load_script("bench/seeds.py")

    def claim(chosen_fd, full_fd, masks_fd, full_copies):
        def row(label, copies, fd):
            return {"label": label, "copy_rate": {"value": copies}, "quality": {"value": fd}}

        runs = [row("trial 3", 0.0, chosen_fd), row("full fine-tuning", full_copies, full_fd)]
        runs += [row(f"control: random mask {k + 1}", 0.0, fd) for k, fd in enumerate(masks_fd)]
        return {"chosen": "trial 3", "runs": runs,
                "checks": [{"what": "copy rate cut by the chosen candidate", "figure": {"value": 1.0}}]}

    claims = [claim(100, 90, (80, 120), 0.4), claim(110, 120, (150, 70), 0.3), claim(95, 100, (90, 100), 0.5)]
    summary = bench.over_studies(claims)
    assert summary["rows"]["chosen candidate"]["quality"] == [100, 110, 95]
    assert summary["checks"] == {"copy rate cut by the chosen candidate": [1.0, 1.0, 1.0]}
    full = summary["differences"]["full fine-tuning"]
    assert full["copy rate"] == pytest.approx([-0.4, -0.3, -0.5]) and full["quality"] == [10, -10, -5]
    assert bench.verdict([100 * x for x in full["copy rate"]]) == "better"
    assert bench.verdict(full["quality"]) == "no different"
    masks = summary["differences"]["control: random masks (each study's mean over its 2)"]
    assert masks["quality"] == [0, 0, 0] and bench.verdict(masks["quality"]) == "no different"
    assert bench.verdict([3.0, 4.0, 5.0]) == "worse"
    assert bench.verdict([-9.4, -9.4, -9.4]) == "not judged" and bench.verdict([0.0, 0.0]) == "no different"
    assert bench.across([0.2, 0.3, 0.4], percent=True, bounds=bench.RATE) == "30% [5%, 55%]"
    assert bench.across([0.0, 0.05, 0.1], percent=True, bounds=bench.RATE).endswith("[0%, 17%]")  # clipped at 0


def test_the_seeds_benchmark_counts_separated_pairs_two_trainings_order_apart():
    # Two hand-made ranking reports of candidates a, b, c: at the second seed b and c swap places on quality.
    bench = load_script("bench/seeds.py")

    def report(mem, qual, separated):
        rows = [{"candidate": i, "label": x, "memorization": m, "quality": q}
                for i, (x, m, q) in enumerate(zip("abc", mem, qual))]
        paired = {key: {"paired95": {"separated": separated, "largest_sets": [[0, 1, 2]]}}
                  for key in ("screen_train_fit~memorization", "screen_quality~quality")}
        return {"ranking": {"rows": rows, "paired": paired}}

    first = report([0.1, 0.2, 0.3], [10, 20, 30], [["a", "b"], ["b", "c"], ["a", "c"]])
    second = report([0.1, 0.25, 0.3], [10, 30, 20], [["c", "b"], ["a", "c"]])
    noise = bench.training_noise([first, second], ["s0", "s1"])
    assert noise["memorization: s0 vs s1"]["spearman"] == pytest.approx(1.0)
    assert noise["memorization: s0 vs s1"]["separated_in_both"] == 2
    assert noise["memorization: s0 vs s1"]["opposite_order"] == 0
    quality = noise["quality: s0 vs s1"]
    assert quality["spearman"] == pytest.approx(0.5) and quality["separated_in_both"] == 2
    assert quality["opposite_pairs"] == [("b", "c")]
    # The target's ceiling: each study's sets ranked by the other's values (here one set, all three candidates).
    assert quality["ceiling"] == [[pytest.approx(0.5)], [pytest.approx(0.5)]]
    assert noise["memorization: s0 vs s1"]["ceiling"] == [[pytest.approx(1.0)], [pytest.approx(1.0)]]


def test_the_seeds_benchmark_finds_the_candidates_apart_beyond_training_noise():
    # Four candidates at two training seeds. Quality: the second seed does not separate c from d, so the largest sets
    # apart in both are {a, b, c} and {a, b, d}; memorization: the two seeds order a and b the opposite way.
    bench = load_script("bench/seeds.py")
    everything = [[x, y] for x, y in itertools.combinations("abcd", 2)]

    def report(mem, qual, screen, separated_quality):
        rows = [{"candidate": i, "label": x, "memorization": m, "quality": q, "screen_train_fit": c,
                 "screen_quality": c} for i, (x, m, q, c) in enumerate(zip("abcd", mem, qual, screen))]
        paired = {"screen_train_fit~memorization": {"paired95": {"separated": everything}},
                  "screen_quality~quality": {"paired95": {"separated": separated_quality}}}
        return {"ranking": {"rows": rows, "paired": paired}}

    first = report([0.1, 0.2, 0.3, 0.4], [10, 20, 30, 40], [1, 2, 3, 0], everything)
    second = report([0.2, 0.1, 0.3, 0.4], [12, 22, 35, 41], [1, 2, 3, 4], [p for p in everything if p != ["c", "d"]])
    apart = bench.apart_in_every_study([first, second], ["s0", "s1"])
    quality = apart["quality"]
    assert quality["candidates"] == 4 and quality["pairs"] == 5
    assert sorted(map(sorted, quality["sets"])) == [["a", "b", "c"], ["a", "b", "d"]]
    # Each seed's screen against its own full values: s0's screen puts d first, the full evaluation last.
    assert quality["screens"]["s0"] == [pytest.approx(-0.5), pytest.approx(1.0)]
    assert quality["screens"]["s1"] == [pytest.approx(1.0), pytest.approx(1.0)]
    memorization = apart["memorization"]
    assert memorization["pairs"] == 5
    assert sorted(map(sorted, memorization["sets"])) == [["a", "c", "d"], ["b", "c", "d"]]


def test_the_affine_residual_forgives_exposure_and_nothing_else():
    # bench/quickstart.py tells a copy at another exposure from another image: a gain and an offset are fitted away,
    # the anatomy is not.
    bench = load_script("bench/quickstart.py")
    gen = torch.Generator().manual_seed(0)
    patient, other = torch.rand(2, 1, 3, 16, 16, generator=gen) * 2 - 1
    assert bench.affine_residual(1.2 * patient - 0.3, patient) < 1e-6
    assert bench.affine_residual(other, patient) > 0.4  # two uniform images share nothing a gain could fit


def test_the_shadow_bench_measures_the_detector_on_a_model_that_never_saw_the_patients(quick_run, tmp_path):
    # The scaled-down config's full fine-tuning on a shadow cohort of other patients, its samples from the private
    # reports, the truth and the detector on them, then the study's detections at both taus; a rerun trains nothing.
    command = [sys.executable, str(REPO / "bench" / "shadow.py"), "--config", str(quick_run["config"]),
               "--out", str(tmp_path / "shadow"), "--sampling-seeds", "0", "1", "--others", "100",
               "--study", str(quick_run["out"]), str(quick_run["config"])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "shadow model (full_ft, lr 0.002): 4 steps on 36 records of 8 patients" in done.stdout
    n = 2 * 3  # two sampling seeds x the config's 3 prompts x 1 per prompt
    assert f"shadow model's samples from the private reports: {n}" in done.stdout
    assert "called copies by the identity truth: " in done.stdout and f"/{n} = " in done.stdout
    assert done.stdout.count("precision") == 2 and "config tau" in done.stdout and "shadow tau" in done.stdout
    # the shadow cohort's patients are others than the private ones (their reports come from their own seeds)
    def reports(manifest):
        return {r["text"] for r in csv.DictReader(open(manifest, encoding="utf-8"))}

    shadow = reports(tmp_path / "shadow" / "shadow_cohort" / "manifest.csv")
    assert shadow and not shadow & reports(HOSPITAL / "private" / "manifest.csv")
    again = subprocess.run(command[:-3], capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert "shadow model (" not in again.stdout and f"samples from the private reports: {n}" in again.stdout
    # the untuned model as a shadow: nothing trained, its samples kept beside the fine-tuned shadow's
    base = subprocess.run(command[:-3] + ["--baseline", "base"], capture_output=True, text=True, cwd=REPO)
    assert base.returncode == 0, base.stderr
    assert "shadow model (" not in base.stdout and f"samples from the private reports: {n}" in base.stdout
    assert (tmp_path / "shadow" / "shadow_samples_base.safetensors").is_file()
    # The identity truth's bench on the same shadow samples and study: the margin rule's limit calibrated on the
    # shadow samples, every rule on the study's runs, and the detector against each rule.
    truth = subprocess.run([sys.executable, str(REPO / "bench" / "truth.py"), "--others", "50", "--copies", "1",
                            "--fresh", "4", "--blends", "2", "--averages", "2", "--shadow", str(tmp_path / "shadow"),
                            "--shadow-config", str(quick_run["config"]),
                            "--study", str(quick_run["out"]), str(quick_run["config"])],
                           capture_output=True, text=True, cwd=REPO)
    assert truth.returncode == 0, truth.stderr
    for name in ("base", "full_ft"):
        assert f"shadow_samples_{name}.safetensors: " in truth.stdout
    assert f" of {n} nearest to a private" in truth.stdout and f"of the {2 * n} shadow samples" in truth.stdout
    assert "margin limit: rho < " in truth.stdout and "| correlation, rho < " in truth.stdout
    detector = truth.stdout.split("the detector at tau")[1].splitlines()[1:4]
    assert [line.split(":")[0].strip() for line in detector][:2] == ["pixel L2 (the truth)", "pixel correlation"]
    assert all("precision" in line and "recall" in line for line in detector)


def test_score_normalization_discounts_a_sample_that_resembles_everyone():
    # bench/detector_rules.py: a sample as close to the background as to the private patient is no copy of that
    # patient; one close to the patient alone keeps its score.
    bench = load_script("bench/detector_rules.py")
    sims_private = [0.9, 0.9]
    sims_background = [[0.2, 0.88, 0.5], [0.1, 0.3, 0.2]]
    assert bench.normalized_scores(sims_private, sims_background, beta=1.0, k=1) == pytest.approx([0.02, 0.6])
    assert bench.normalized_scores(sims_private, sims_background, beta=0.5, k=2) == pytest.approx([0.65, 0.8])


def test_patient_ranks_count_the_patients_nearer_in_pixels():
    bench = load_script("bench/detector_rules.py")
    gen = torch.Generator().manual_seed(0)
    private = torch.rand(5, 1, 4, 4, generator=gen)
    keys = ["b", "a", "b", "c", "a"]  # patients with several records count once, by their nearest record
    others = torch.rand(30, 1, 4, 4, generator=gen)
    samples = torch.cat([private[2:3] + 0.01, torch.rand(6, 1, 4, 4, generator=gen)])
    ranks = bench.patient_ranks(samples, private, keys, others)
    assert ranks.shape == (7, 3) and ranks[0, 1] == 1  # the near copy of b's second record: b ranks first
    records, strangers = private.flatten(1).double(), others.flatten(1).double()
    for i, x in enumerate(samples.flatten(1).double()):
        d_private = {k: min(float((x - records[j]).norm()) for j in range(5) if keys[j] == k) for k in "abc"}
        d_others = [float((x - o).norm()) for o in strangers]
        for column, k in enumerate("abc"):
            nearer = sum(d < d_private[k] for d in [*d_private.values(), *d_others])
            assert ranks[i, column] == 1 + nearer


def test_the_near_miss_truth_counts_every_patient_within_k():
    bench = load_script("bench/detector_rules.py")
    ranks = np.array([[1, 7, 3], [9, 6, 12], [2, 4, 5]])  # 3 samples x patients a, b, c
    scored = bench.near_miss(["b", None, "b"], ranks, ["a", "b", "c"], k=5)
    # sample 0 copies a and c (b is 7th: its detection is wrong), sample 1 nobody, sample 2 all three
    assert scored == {"true_positives": 1, "detected": 2, "true_copies": 2}
    assert bench.near_miss(["b", None, "b"], ranks, ["a", "b", "c"], k=7)["true_positives"] == 2


def test_the_detector_comparison_scores_both_truths_and_pairs_the_differences():
    bench = load_script("bench/detector_rules.py")
    # 8 samples: 0-3 near-miss copies (0-1 also pixel-truth copies); the reference names 0, 1 and 6 (6 wrongly), the
    # candidate 0-3; a third detector is the reference again
    copies = [1, 1, 1, 1, 0, 0, 0, 0]
    pixel_copies = [1, 1, 0, 0, 0, 0, 0, 0]
    reference, candidate = [1, 1, 0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]
    named = [reference, candidate, reference]
    near_right = [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    pixel_right = [[1, 1, 0, 0, 0, 0, 0, 0]] * 3
    result = bench.detector_comparison(copies, named, near_right, pixel_right, pixel_copies, resamples=500)
    ref, cand, same = result["detectors"]
    assert (result["near_copies"], result["pixel_copies"], ref["detected"], cand["detected"]) == (4, 2, 3, 4)
    assert ref["near"]["precision"].value == pytest.approx(2 / 3) and ref["near"]["recall"].value == 0.5
    assert cand["near"]["precision"].value == 1.0 and cand["near"]["recall"].value == 1.0
    assert cand["pixel"]["precision"].value == 0.5 and cand["pixel"]["recall"].value == 1.0
    assert ref["near"]["recall"].low < 0.5 < ref["near"]["recall"].high  # Wilson, not a point
    diff = cand["difference"]
    assert diff["level"] == pytest.approx(0.975)  # Bonferroni over the two compared detectors
    assert diff["recall"].value == 0.5 and diff["precision"].value == pytest.approx(1 / 3)
    assert diff["recall"].low >= 0 and diff["recall"].high <= 1  # the candidate finds every copy the reference does
    assert (same["difference"]["recall"].low, same["difference"]["recall"].high) == (0, 0)


def test_an_ensemble_of_detectors_scores_the_mean_of_their_cosine_similarities():
    bench = load_script("bench/detector_rules.py")

    class Linear:  # an embedder: a fixed random projection of the pixels
        def __init__(self, seed):
            self.w = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed))

        def embed(self, images):
            return images.flatten(1) @ self.w

    members = [Linear(0), Linear(1), Linear(2)]
    a, b = torch.randn(4, 3, 2, 2), torch.randn(6, 3, 2, 2)
    ensemble = bench.Ensemble(members)
    similarity = ensemble.embed(a) @ ensemble.embed(b).T
    expected = torch.stack([F.normalize(m.embed(a), dim=1) @ F.normalize(m.embed(b), dim=1).T for m in members]).mean(0)
    assert torch.allclose(similarity, expected, atol=1e-6)
    assert torch.allclose(ensemble.embed(a).norm(dim=1), torch.ones(4), atol=1e-6)


def test_the_threshold_frontier_is_what_trying_every_threshold_finds():
    bench = load_script("bench/detector_rules.py")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 40))
        sims = np.round(rng.random(n), 1)  # ties, which no threshold can split
        named = [str(k) for k in rng.integers(0, 3, n)]
        truth = [None if rng.random() < 0.4 else str(k) for k in rng.integers(0, 3, n)]
        floors = dict(precision_floor=0.6, recall_floor=0.5)
        (best_p, at_p), (best_r, at_r) = bench.threshold_frontier(sims, named, truth, **floors)
        n_true = sum(t is not None for t in truth)
        tried = []
        for threshold in [*np.unique(sims), sims.min() - 1]:
            hits = sum(s > threshold and d == t for s, d, t in zip(sims, named, truth))
            detected = int((sims > threshold).sum())
            if detected and n_true:
                tried.append((threshold, hits / detected, hits / n_true))
        qualified_p = [p for _, p, r in tried if r >= floors["recall_floor"]]
        qualified_r = [r for _, p, r in tried if p >= floors["precision_floor"]]
        assert best_p == (pytest.approx(max(qualified_p)) if qualified_p else None)
        assert best_r == (pytest.approx(max(qualified_r)) if qualified_r else None)
        for best, at, column in ((best_p, at_p, 1), (best_r, at_r, 2)):
            if best is not None:  # the threshold it names gives the figure it names
                hits = sum(s > at and d == t for s, d, t in zip(sims, named, truth))
                assert best == pytest.approx([hits / int((sims > at).sum()), hits / n_true][column - 1])


def test_the_detector_rules_bench_scores_a_study(quick_run, tmp_path):
    # The config's rule must be the search's own detection. At the quick run's tau nothing may be detected, so the
    # check runs at the median similarity of its samples: about half of them detected.
    quickstart = load_script("bench/quickstart.py")
    runs = list(quickstart.evaluated_runs(quick_run["out"]))
    similarities = [n["similarity"] for _, folder in runs
                    for n in json.loads((folder / "neighbours.json").read_text())]
    tau = float(np.median(similarities))
    config = write_config(tmp_path / "median_tau.yaml", {"base": str(quick_run["config"]),
                                                         "objectives": {"memorization": {"tau": tau}}})
    command = [sys.executable, str(REPO / "bench" / "detector_rules.py"), "--others", "50", "--calibration", "100",
               "--background", "50", "--chance", "20", "--tau-sets", "0", "--fpr", "0.9",
               "--study", str(quick_run["out"]), str(config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "normalized score's threshold" in done.stdout and "every threshold on the search-time" in done.stdout
    expected = sum(d is not None for _, folder in runs for d in quickstart.detections(folder, tau))
    assert 0 < expected < len(similarities)
    line = next(line for line in done.stdout.splitlines() if ", config rule: " in line)
    assert int(line.split(", config rule: ")[1].split(" detected")[0]) == expected
    assert f"({len(similarities)} samples; a diagnostic" in done.stdout
    assert "20 further real patients of the site called copies" in done.stdout
    near = next(line for line in done.stdout.splitlines() if "against the near-miss truth (k 5)" in line)
    assert int(near.split("truth (k 5): ")[1].split(" detected")[0]) == expected  # the same detections, judged again

    normalized = [line for line in done.stdout.splitlines() if ", normalized rule: " in line]

    # The configs' own detector as a candidate: the same tau at the same patients, the same detections, no difference.
    # At a false-positive rate of 0.9 the tiny model's samples are detected too, so precision is a number.
    shipped = REPO / "data" / "metric_nets" / "copy_detector"
    assert load_config(config)["objectives"]["memorization"]["features"]["path"].endswith("metric_nets/copy_detector")
    # An ensemble of it twice (the mean of two equal similarities) is the same detector again. A barely trained net
    # names other patients: the other rules' figures must not move with it.
    twice = f"{shipped},{shipped}"
    untrained = tmp_path / "untrained"
    assert load_script("pipelines/train_metric_nets.py").main(
        ["--only", "copy_detector", "--patients", "12", "--eval-patients", "8", "--steps", "2", "--batch-size", "8",
         "--out", str(untrained)]) == 0
    done = subprocess.run(command + ["--candidate", str(shipped), "--candidate", twice,
                                     "--candidate", str(untrained / "copy_detector")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if ", normalized rule: " in line] == normalized
    ours = next(line for line in lines if line.startswith("configs' detector: "))
    assert int(ours.split(": ")[1].split(" detected")[0]) > 0
    for candidate in (shipped, twice):
        theirs = next(line for line in lines if line.startswith(f"candidate {candidate}: "))
        assert ours.split(": ", 1)[1] == theirs.split(": ", 1)[1]
        difference = lines[lines.index(theirs) + 1]
        assert "precision 0 [0, 0], recall 0 [0, 0]" in difference
    missing = subprocess.run(command + ["--candidate", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and f"--candidate {tmp_path}: no config.json there" in missing.stderr
