"""Published mitigations as baselines: Somepalli et al.'s caption randomisation in the training loop, Wen et al.'s
prompt-embedding adjustment before sampling, and their rows in a search."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_masks import CAPTIONS
from fixtures_scripts import load_script
from fixtures_search import cheap_search_config, write_config

from memcontrol.config import read_config
from memcontrol.masks import Mask
from memcontrol.metrics.intervals import bootstrap_indices, paired
from memcontrol.mitigations.captions import CaptionMitigation, caption_mitigator, randomise_captions, word_token_ids
from memcontrol.training import TrainConfig, finetune
from memcontrol.training.cache import tokenize

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO / "data" / "base_model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(BASE_MODEL / "tokenizer"))


def _body(row: list[int], tok) -> list[int]:
    """The caption's own tokens: between start and end of text, padding dropped."""
    end = row.index(tok.eos_token_id, 1)
    return row[1:end]


def _is_subsequence(small: list[int], big: list[int]) -> bool:
    it = iter(big)
    return all(x in it for x in small)


def test_random_insertion_changes_captions_at_rate_p_with_vocabulary_words(tokenizer):
    vocab = word_token_ids(tokenizer)
    words = set(vocab)
    assert len(vocab) > 50 and tokenizer.bos_token_id not in words and tokenizer.eos_token_id not in words
    captions = CAPTIONS * 400  # 2400 draws
    plain = tokenize(tokenizer, captions).tolist()
    ids, hit = randomise_captions(captions, "random_insert", 0.3, 2, tokenizer, vocab, torch.Generator().manual_seed(0))
    # Binomial(2400, 0.3): standard deviation 0.0094; 0.04 is more than four of them.
    assert abs(hit.float().mean().item() - 0.3) < 0.04
    for row, orig, changed in zip(ids.tolist(), plain, hit.tolist()):
        if not changed:
            assert row == orig
            continue
        body, own = _body(row, tokenizer), _body(orig, tokenizer)
        assert len(body) == len(own) + 2 and _is_subsequence(own, body)
        inserted = list(body)
        for t in own:  # what is left after the caption's own tokens are taken out, in order
            inserted.remove(t)
        assert len(inserted) == 2 and set(inserted) <= words
    again, hit_again = randomise_captions(captions, "random_insert", 0.3, 2, tokenizer, vocab,
                                          torch.Generator().manual_seed(0))
    other, _ = randomise_captions(captions, "random_insert", 0.3, 2, tokenizer, vocab, torch.Generator().manual_seed(1))
    assert torch.equal(again, ids) and torch.equal(hit_again, hit) and not torch.equal(other, ids)


def test_random_replacement_trains_on_random_vocabulary_words(tokenizer):
    vocab = word_token_ids(tokenizer)
    ids, hit = randomise_captions(CAPTIONS * 50, "random_replace", 1.0, 4, tokenizer, vocab,
                                  torch.Generator().manual_seed(0))
    assert bool(hit.all())
    bodies = [_body(row, tokenizer) for row in ids.tolist()]
    assert all(len(b) == 4 and set(b) <= set(vocab) for b in bodies)
    assert len({tuple(b) for b in bodies}) > 250  # random, not one fixed caption


def test_caption_mitigation_is_off_by_default():
    spec = TrainConfig().caption_mitigation
    assert spec.kind == "none" and caption_mitigator(spec, None, None, 0) is None
    assert caption_mitigator(CaptionMitigation(kind="random_insert", p=0), None, None, 0) is None
    assert CaptionMitigation(kind="random_insert").resolved() == (0.1, 2)  # the authors' script's defaults
    assert CaptionMitigation(kind="random_replace").resolved() == (0.1, 4)


class _TextEncoderInputs:
    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_hook(lambda m, args, kwargs_out: self.seen.append(args[0].clone()))


def test_the_training_loop_feeds_the_text_encoder_randomised_captions(tiny_pipe, tiny_cached):
    mask = Mask(["mid_block"], "unfreeze")
    base = TrainConfig(steps=3, batch_size=2, lr=1e-3, caption_dropout=0.0, seed=3)
    hook = _TextEncoderInputs(tiny_pipe.text_encoder)
    try:
        plain = finetune(tiny_pipe, mask, tiny_cached, base, progress=False)
        assert hook.seen == []  # without a mitigation the loop trains on the cached embeddings only
        spec = {"kind": "random_insert", "p": 1.0, "tokens": 3}
        mitigated = finetune(tiny_pipe, mask, tiny_cached, base.model_copy(update={
            "caption_mitigation": CaptionMitigation(**spec)}), progress=False)
    finally:
        hook.handle.remove()
    assert len(hook.seen) == 3 and all(len(ids) == 2 for ids in hook.seen)  # every item of every step
    own = {tuple(_body(row, tiny_pipe.tokenizer)) for row in tokenize(tiny_pipe.tokenizer, tiny_cached.captions).tolist()}
    words = set(word_token_ids(tiny_pipe.tokenizer))
    for ids in hook.seen:
        for row in ids.tolist():
            body = _body(row, tiny_pipe.tokenizer)
            assert tuple(body) not in own
            assert any(_is_subsequence(list(o), body) and len(body) == len(o) + 3 for o in own)
            assert set(body) - set().union(*own) <= words
    assert plain.losses != mitigated.losses  # same batches and noise, other text conditioning
    noisy = finetune(tiny_pipe, mask, tiny_cached, base.model_copy(update={
        "caption_mitigation": CaptionMitigation(kind="embedding_noise", sigma=0.5)}), progress=False)
    assert noisy.losses[0] != pytest.approx(plain.losses[0], abs=1e-7)


def test_wen_lowers_the_noise_norm_and_the_sampler_uses_the_adjusted_embedding():
    from memcontrol.metrics.noise_norm import _encode, noise_norm
    from memcontrol.mitigations.wen import WenConfig, adjust_prompt_embeds
    from memcontrol.models import load_pipeline
    from memcontrol.sampling import generate_samples, scheduler_for

    pipe = load_pipeline(BASE_MODEL)
    prompts = ["chest radiograph pa view normal"]
    adjusted, report = adjust_prompt_embeds(pipe, prompts, WenConfig(starts=1), num_inference_steps=2, sampler="dpm")
    cond, empty = _encode(pipe, prompts)
    # The stopping rule: below half of the starting norm on the optimisation's own start, within the step cap.
    assert report["end"][0] < 0.5 * report["start"][0] and 1 <= report["iterations"][0] <= 10
    # On starts it never saw (seeds 5..12, not the optimisation's): measured 1.96 -> 0.56 on a 2-core CPU.
    sched = scheduler_for(pipe, "dpm")
    kwargs = dict(uncond_embeds=empty, scheduler=sched, num_inference_steps=2, samples_per_prompt=8, seed=5,
                  progress=False)
    before, after = noise_norm(pipe.unet, cond, **kwargs), noise_norm(pipe.unet, adjusted, **kwargs)
    assert after[0] < 0.7 * before[0]
    sample = dict(steps=2, sampler="dpm", guidance_scale=2.0, seed=0)
    plain = generate_samples(pipe, prompts, **sample)
    same = generate_samples(pipe, prompts, prompt_embeds=cond, **sample)
    mitigated = generate_samples(pipe, prompts, prompt_embeds=adjusted, **sample)
    assert torch.allclose(same, plain, atol=1e-5)  # the prompt's own embedding and noise: the same image
    assert (mitigated - plain).abs().mean() > 0.01


def test_a_search_reports_the_mitigation_baselines_with_intervals(tmp_path, tiny_pipe_dir, search_data):
    from memcontrol.cli import main

    methods = ["full_ft", "full_ft_random_insert", "full_ft_wen", "full_ft_dedup"]
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"n_trials": 1},
                              baselines={"enabled": True, "methods": methods,
                                         "captions": {"p": 0.5}, "wen": {"starts": 1, "steps": 3}})
    out = tmp_path / "run"
    argv = ["search", "--config", str(write_config(tmp_path / "search.yaml", cfg)), "--out", str(out)]
    assert main(argv) == 0
    rows = {r["label"]: r for r in csv.DictReader(open(out / "trials.csv")) if r["kind"] == "baseline"}
    labels = {"full_ft": "full fine-tuning", "full_ft_random_insert": "full FT + random token insertion",
              "full_ft_wen": "full FT + Wen et al. inference mitigation",
              "full_ft_dedup": "full FT on de-duplicated data"}
    assert set(rows) == set(labels.values())
    for row in rows.values():
        assert row["state"] == "complete"
        for name in ("memorization", "quality", "copy_fraction"):
            low, value, high = (float(row[f"{name}{s}"]) for s in ("_ci_low", "", "_ci_high"))
            assert low <= value <= high
    wen, full = rows[labels["full_ft_wen"]], rows[labels["full_ft"]]
    # The Wen row samples the full_ft row's trained model: loaded, not trained again.
    assert {wen["reused_training"], full["reused_training"]} == {"True", "False"}
    assert float(wen["train_seconds"]) == 0.0 and wen["steps"] == full["steps"] == "4"
    assert len(list((out / "baselines" / "_trained").glob("*.safetensors"))) == 1
    assert float(wen["wen_norm_end"]) <= float(wen["wen_norm_start"])
    # The cohort holds one patient twice (7 records): de-duplication trains on the other 6.
    assert rows[labels["full_ft_dedup"]]["train_records"] == "6"
    assert "train_records" not in full or full["train_records"] == ""
    candidate = json.loads((out / "baselines" / "full_ft_random_insert" / "candidate.json").read_text())
    assert candidate["train"]["caption_mitigation"] == {"p": 0.5, "tokens": None, "sigma": 0.1,
                                                        "kind": "random_insert"}
    # The claim is written against full fine-tuning, with a verdict for every other row.
    claim = json.loads((out / "claim.json").read_text())
    runs = {r["label"] for r in claim["runs"]}
    assert {"base model, not fine-tuned", "full fine-tuning"} <= runs and claim["chosen"] in runs
    assert {c["label"] for c in claim["comparisons"]} == set(labels.values())
    for c in claim["comparisons"]:
        assert {c["copy"], c["quality"]} <= {"better", "worse", "no different"}
        assert c["quality_difference"]["low"] <= c["quality_difference"]["high"]
    assert "full fine-tuning" in (out / "claim.md").read_text()
    # bench/fidelity.py --run screens the runs of the search space only: each mitigation trains on other captions or
    # data, or samples otherwise, and the base model trains nothing.
    bench = load_script("bench/fidelity.py")
    found = [row for row, _ in bench.study_candidates(out)]
    screened = {row["label"] for row in found}
    assert "full fine-tuning" in screened and "trial 0" in screened
    assert not screened & (set(labels.values()) - {"full fine-tuning"})
    # Its paired reading starts from the files each run kept: on all samples they give the study's own figures.
    job = read_config(tmp_path / "search.yaml")
    stats, sizes = bench.run_statistics(out, found)
    for name in ("memorization", "quality"):
        for row, statistic in zip(found, stats[name]):
            assert statistic(np.arange(sizes[name])[None])[0] == pytest.approx(row[name], rel=1e-6)
        # Separated exactly when the library's paired interval of the difference excludes 0.
        indices = bootstrap_indices(sizes[name], job.objectives.bootstrap_resamples, job.sampling.seed)
        separated = bench.paired_separation(stats[name], sizes[name], job.sampling.seed,
                                            job.objectives.bootstrap_resamples, 0.95)
        assert separated[0, 1] == paired(stats[name][0], stats[name][1], indices).excludes(0.0)
    # Screens written by an earlier run of the bench are reused only for exactly the study's runs.
    earlier = [{"folder": row["folder"], "screen_status": "screened", "screen_seconds": 1.0, "screen_train_fit": -0.5,
                "screen_noise_norm": 1.5, "screen_quality": 0.25} for row in found]
    (tmp_path / "screens.json").write_text(json.dumps({"ranking": {"rows": earlier}}))
    folders = [row["folder"] for row in found]
    reused = bench.earlier_screens(tmp_path / "screens.json", folders)
    assert [r["metrics"]["screen_train_loss"] for r in reused] == [0.5] * len(found)
    # Screens from before the sampled quality proxy: their quality measure is the held-out loss, nothing else.
    measures = [bench.screen_measures(r["metrics"]) for r in reused]
    assert measures[0]["screen_quality"] == 0.25 and math.isnan(measures[0]["screen_sample_fd"])
    assert bench.measured(measures) == [("screen_train_fit", "memorization"), ("screen_noise_norm", "memorization"),
                                        ("screen_quality", "quality")]
    with pytest.raises(SystemExit, match="not the same runs"):
        bench.earlier_screens(tmp_path / "screens.json", folders[:-1])
    # bench/interval_coverage.py --run recomputes the claim's paired quality comparisons from the kept features: its
    # percentile intervals are claim.json's (the README sets the basic interval beside them on that basis).
    bench = load_script("bench/interval_coverage.py")
    recomputed = bench.claim_comparisons(out, job.objectives.bootstrap_resamples, job.sampling.seed)
    assert [r["label"] for r in recomputed] == [c["label"] for c in claim["comparisons"]]
    for row in recomputed:
        assert row["percentile"][:3] == pytest.approx(row["claim.json"][:3], rel=1e-9, abs=1e-9), row
        assert row["percentile"][3] == row["claim.json"][3]
        value, low, high, _ = row["basic"]
        width = row["percentile"][2] - row["percentile"][1]
        assert value == row["percentile"][0] and high - low == pytest.approx(width)
    # A rerun finds every row done and recomputes nothing.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "baselines").rglob("metrics.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "baselines").rglob("metrics.json")} == stamp
