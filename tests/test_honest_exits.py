"""Runs that never report success falsely: a wrong config is refused before any work, an error that every trial
would meet stops the study, a study where no trial completed exits non-zero, an --out that is not this job's folder
is refused; and an audit after a search reuses the search's features."""

from __future__ import annotations

import pytest
import yaml

from fixtures_search import cheap_search_config, write_config
from memcontrol.cli import main


def _finetune_config(path, pipe_dir, data, **extra):
    cfg = {"model": {"path": str(pipe_dir), "device": "cpu"},
           "data": {"train": str(data["train"]), "resolution": 64},
           "train": {"steps": 2, "batch_size": 2},
           "mask": {"family": "lora", "sites": ["mid_block.attentions.0"], "params": {"rank": 2}}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_finetune_refuses_a_misspelt_section_before_training(tmp_path, tiny_pipe_dir, search_data, capsys):
    config = _finetune_config(tmp_path / "ft.yaml", tiny_pipe_dir, search_data, tain={"steps": 2})
    assert main(["finetune", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    assert "`tain`: unknown; did you mean `train`?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, values, message", [
    ("objectives", {"memorization": {"metric": "mean_similarity", "feautres": {"type": "pixels"}}},
     "`objectives.memorization.feautres`: unknown; did you mean `features`?"),
    ("objectives", {"memorization": {"metric": "mean_similarity", "features": {"type": "vae"}, "tau": "heldout"}},
     "`objectives.memorization.tau`"),
    ("sampling", {"sampler": "euler"}, "`sampling.sampler`: Input should be 'ddim' or 'dpm'"),
])
def test_search_refuses_a_wrong_setting_before_any_trial(tmp_path, tiny_pipe_dir, search_data, capsys, section,
                                                         values, message):
    cfg = cheap_search_config(tiny_pipe_dir, search_data)
    cfg[section] = values
    config = write_config(tmp_path / "search.yaml", cfg)
    assert main(["search", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_error_every_trial_would_meet_stops_the_study(tmp_path, tiny_pipe_dir, search_data, capsys):
    # fp16 mixed precision is refused on a CPU when training starts: not the candidate's failure but the config's.
    cfg = cheap_search_config(tiny_pipe_dir, search_data, train={"mixed_precision": "fp16"}, search={"n_trials": 3})
    config = write_config(tmp_path / "search.yaml", cfg)
    assert main(["search", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "trials/0 stopped the study" in err and "fp16 needs a CUDA device" in err
    assert not (tmp_path / "out" / "trials" / "1").exists()  # no second trial was started


def test_a_study_where_no_trial_completed_exits_non_zero_and_names_the_first_failure(tmp_path, tiny_pipe_dir,
                                                                                     search_data, capsys):
    # A learning rate this large makes the loss non-finite: each candidate fails on its own, the study goes on.
    space = {"granularity": "block", "kinds": ["attention"], "family": "lora", "train": {"lr": 1.0e30}}
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"n_trials": 2})
    cfg["space"] = space
    config = write_config(tmp_path / "search.yaml", cfg)
    assert main(["search", "--config", str(config), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "2 failed" in captured.out
    assert "no trial completed; the first failure, trial 0: " in captured.err and "loss" in captured.err


@pytest.mark.parametrize("job", ["search", "finetune", "audit"])
def test_an_out_that_is_a_file_or_another_folder_is_refused(tmp_path, tiny_pipe_dir, search_data, capsys, job):
    config = (write_config(tmp_path / "c.yaml", cheap_search_config(tiny_pipe_dir, search_data)) if job == "search"
              else _finetune_config(tmp_path / "c.yaml", tiny_pipe_dir, search_data))
    args = {"search": ["--config", str(config)], "finetune": ["--config", str(config)],
            "audit": ["--model", str(tiny_pipe_dir), "--manifest", str(search_data["train"])]}[job]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run folder")
    assert main([job, *args, "--out", str(a_file)]) == 1
    assert f"--out {a_file} is a file" in capsys.readouterr().err
    someone_elses = tmp_path / "data"
    someone_elses.mkdir()
    (someone_elses / "manifest.csv").write_text("path,text\n")
    assert main([job, *args, "--out", str(someone_elses)]) == 1
    assert "holds no memcontrol" in capsys.readouterr().err
    assert sorted(p.name for p in someone_elses.iterdir()) == ["manifest.csv"]


def test_an_audit_after_a_search_embeds_nothing_the_search_embedded(tmp_path, tiny_pipe_dir, search_data,
                                                                     monkeypatch):
    from memcontrol.audit import run_audit
    from memcontrol.metrics import Embedder

    calls = []
    real_embed = Embedder.embed

    def counted(self, images, desc=None):
        calls.append((self.name, len(images)))
        return real_embed(self, images, desc=desc)

    monkeypatch.setattr(Embedder, "embed", counted)
    cache = tmp_path / "features"
    cfg = cheap_search_config(tiny_pipe_dir, search_data, search={"n_trials": 1})
    cfg["data"]["cache_dir"] = str(cache)
    assert main(["search", "--config", str(write_config(tmp_path / "s.yaml", cfg)), "--out",
                 str(tmp_path / "search")]) == 0
    by_search, calls_in_search = set(calls), list(calls)
    calls.clear()
    files = sorted(p.name for p in cache.glob("features-*"))
    audit = {"audit": {"device": "cpu", "max_prompts": 3, "cache_dir": str(cache),
                       "generation": {"steps": 2, "sampler": "ddim"}, "noise_norm": {"enabled": False},
                       "features": [{**cfg["objectives"]["memorization"]["features"], "tau": 0.9},
                                    {**cfg["objectives"]["quality"]["features"], "tau": 0.9}],
                       "quality": {"features": "pixels4", "kid_subset_size": 3}}}
    metrics = run_audit(tiny_pipe_dir, tmp_path / "audit", manifest=search_data["train"],
                        heldout=search_data["heldout"], config=audit)
    assert "quality" in metrics["checks"] and "copy_detection" in metrics["checks"]
    # The search embedded the training set (memorization features) and the held-out set (quality features), and
    # its training-data audit (data_audit, on by default) both sets in its own pixel space, once; the audit finds
    # the first two in the cache and embeds only what is new to it.
    assert {(name, n) for name, n in by_search if n > 3} == {("pixels16", 7), ("pixels4", 4), ("pixels32", 7),
                                                              ("pixels32", 4)}
    assert sum(name == "pixels32" for name, _ in calls_in_search) == 2
    assert not set(calls) & by_search, calls
    assert set(files) <= {p.name for p in cache.glob("features-*")}
