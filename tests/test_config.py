"""The typed configuration layer: every shipped config is valid; every mistake is refused with the file, the key path
and the closest valid name; base presets merge deeply; `memcontrol config check|show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memcontrol.cli import main
from memcontrol.config import read_config
from memcontrol.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_is_valid_and_shows_as_itself(name, capsys, tmp_path):
    assert main(["config", "check", str(CONFIGS / name)]) == 0
    assert capsys.readouterr().out.strip().endswith("valid")
    assert main(["config", "show", str(CONFIGS / name)]) == 0
    shown = _write(tmp_path / name, yaml.safe_load(capsys.readouterr().out))
    assert read_config(shown) == read_config(CONFIGS / name)


@pytest.mark.parametrize("cfg, message", [
    ({"tain": {"steps": 3}}, r"`tain`: unknown; did you mean `train`\?"),
    ({"objectives": {"memorization": {"feautres": {"type": "vae"}}}},
     r"`objectives.memorization.feautres`: unknown; did you mean `features`\?"),
    ({"objectives": {"memorization": {"tau": "heldout"}}}, r"`objectives.memorization.tau`: .*\(got 'heldout'\)"),
    ({"sampling": {"sampler": "euler"}}, r"`sampling.sampler`: Input should be 'ddim' or 'dpm' .*\(got 'euler'\)"),
    ({"objectives": {"quality": {"features": {"type": "pixels", "sizee": 8}}}},
     r"`objectives.quality.features.sizee`: unknown; did you mean `size`\?"),
    ({"audit": {"features": [{"type": "vae", "tau": 0.5}, {"type": "pixels", "tua": 0.9}]}},
     r"`audit.features\[1\].tua`: unknown; did you mean `tau`\?"),
    ({"data": {"train": {"source": "t.csv", "text_colum": "report"}}},
     r"`data.train.text_colum`: unknown; did you mean `text_column`\?"),
    ({"train": {"caption_dropout": 1.5}}, r"`train.caption_dropout`: Input should be less than 1"),
    ({"search": {"n_trials": "many"}}, r"`search.n_trials`: Input should be a valid integer"),
    ({"model": {"device": "gpu"}}, r"`model.device`: not a device"),
    ({"space": {"train": {"lrr": {"low": 1e-4, "high": 1e-3}}}}, r"`lrr` is not a train setting; did you mean `lr`"),
    ({"mask": {"family": "lora", "sites": ["mid_block"], "params": {"rnk": 2}}}, r"`mask`: unknown lora parameter"),
])
def test_mistakes_are_refused_with_the_file_and_the_key(tmp_path, cfg, message):
    path = _write(tmp_path / "mine.yaml", cfg)
    with pytest.raises(ConfigError, match=message) as err:
        read_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_config_check_names_every_mistake_and_exits_non_zero(tmp_path, capsys):
    path = _write(tmp_path / "mine.yaml", {"tain": {}, "sampling": {"stpes": 3}})
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "`tain`: unknown; did you mean `train`?" in err and "`sampling.stpes`: unknown; did you mean `steps`?" in err


def test_base_presets_merge_deeply_and_show_fills_every_default(tmp_path, capsys):
    _write(tmp_path / "preset.yaml", {
        "objectives": {"memorization": {"metric": "p95_similarity", "features": {"type": "pixels", "size": 16}}},
        "baselines": {"lr": {"full_ft": 2.0e-3}}})
    mine = _write(tmp_path / "mine.yaml", {"base": "preset.yaml", "objectives": {"memorization": {"tau": 0.7}},
                                            "baselines": {"lr": {"bitfit_norm": 3.0e-3}},
                                            "model": {"path": "models/base"}})
    assert main(["config", "show", str(mine)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["objectives"]["memorization"] == {"metric": "p95_similarity", "features": {"type": "pixels",
                                                                                             "size": 16}, "tau": 0.7}
    assert shown["baselines"]["lr"] == {"full_ft": 2.0e-3, "lora_attention": 1e-4, "bitfit_norm": 3.0e-3}
    assert shown["objectives"]["quality"] == {"metric": "fd", "features": {"type": "vae"}, "kid_subsets": 10,
                                             "kid_subset_size": 1000}
    assert shown["model"]["path"] == str(tmp_path / "models" / "base")  # relative to the file that names it
    # What `show` prints reads back as the same configuration.
    assert read_config(_write(tmp_path / "shown.yaml", shown)) == read_config(mine)


def test_paths_in_a_base_preset_start_from_the_preset_s_folder(tmp_path, capsys):
    """A config elsewhere extends a preset that names data beside it (as `base: .../configs/paper.yaml` does): the
    preset's paths keep pointing beside the preset, the extending file's paths beside that file, at every depth of
    `base:` and in every kind of path field (model, data shorthand, features, search space file)."""
    presets, mine_dir = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    (presets / "deeper").mkdir(parents=True)
    mine_dir.mkdir()
    _write(presets / "deeper" / "root.yaml", {"model": {"path": "../../models/base"}})
    _write(presets / "space.yaml", {"space": {"families": ["lora"]}})
    _write(presets / "paper.yaml", {
        "base": "deeper/root.yaml", "data": {"train": "../data/private.csv", "heldout": {"source": "../data/h.csv"}},
        "objectives": {"memorization": {"features": {"type": "metric_net", "path": "../nets/copy"}}},
        "space": "space.yaml"})
    mine = _write(mine_dir / "mine.yaml", {"base": "../project/configs/paper.yaml",
                                           "data": {"heldout": {"source": "my_heldout.csv"}}})
    assert main(["config", "show", str(mine)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    project = tmp_path / "project"
    assert shown["model"]["path"] == str(project / "models" / "base")
    assert shown["data"]["train"]["source"] == str(project / "data" / "private.csv")
    assert shown["data"]["heldout"]["source"] == str(mine_dir / "my_heldout.csv")
    assert shown["objectives"]["memorization"]["features"]["path"] == str(project / "nets" / "copy")
    assert read_config(mine).space == str(presets / "space.yaml")


def test_overrides_from_the_command_line_are_checked_too(tmp_path):
    from memcontrol.search.settings import load_settings

    path = _write(tmp_path / "mine.yaml", {"model": {"path": "m"}, "data": {"train": "t.csv", "heldout": "h.csv"}})
    with pytest.raises(ConfigError, match="--workers 0: Input should be greater than or equal to 1"):
        load_settings(path, tmp_path / "out", workers=0)
