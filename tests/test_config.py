"""Strict config: every recipe loads, unknown keys and wrong types are named errors."""
from pathlib import Path

import pytest
import yaml

from edgessl.config import ConfigError, dump_yaml, from_dict, load_yaml, to_dict
from edgessl.methods import PRESETS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_recipe_is_named_and_every_named_recipe_exists():
    """The recipes the README, docs, Makefile, scripts and tests name are in configs/, and each
    recipe in configs/ is named somewhere (a recipe nobody names is dead)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    texts = [p.read_text() for p in [repo / "README.md", repo / "Makefile", *(repo / "docs").glob("*.md"),
                                     *(repo / "scripts").glob("*.py"), *(repo / "tests").glob("*.py")]]
    named = {m for t in texts for m in re.findall(r"configs/((?:bench/)?[a-z0-9_-]+\.yaml)", t)}
    have = {str(p.relative_to(repo / "configs")) for p in (repo / "configs").rglob("*.yaml")}
    assert named - have == set(), "named but missing"
    assert have - named == set(), "in configs/ but named nowhere"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = from_dict(load_yaml(path))
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg  # round trip through config.yaml


def test_npid_yaml_equals_preset():
    method = load_yaml(Path(CONFIGS[0]).parent / "npid.yaml")["method"]
    assert method.pop("name") == "npid"
    assert method == PRESETS["npid"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'method.tempreature'"):
        from_dict({"method": {"tempreature": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'mehtod'"):
        from_dict({"mehtod": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="'optim.lr' must be float"):
        from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="'optim.batch_size' must be str or int"):
        from_dict({"optim": {"batch_size": 12.5}})
    with pytest.raises(ConfigError, match="'method.head_dims\\[1\\]' must be int"):
        from_dict({"method": {"head_dims": [8, "x"]}})
    with pytest.raises(ConfigError, match="'run.seed' must be int"):
        from_dict({"run": {"seed": True}})


def test_choices_and_ranges():
    with pytest.raises(ConfigError, match="method.bank_update"):
        from_dict({"method": {"bank_update": "sgd"}})
    with pytest.raises(ConfigError, match="method.negatives"):
        from_dict({"method": {"negatives": "some"}})
    with pytest.raises(ConfigError, match="optim.lr"):
        from_dict({"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="optim.epochs"):
        from_dict({"optim": {"epochs": None}})  # no epoch count needs a minute budget
    assert from_dict({"optim": {"epochs": None, "minutes": 2}}).optim.epochs is None


def test_int_accepted_for_float_and_tuple_from_list():
    cfg = from_dict({"optim": {"lr": 1}, "augment": {"crop_scale": [0.5, 1]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.augment.crop_scale == (0.5, 1.0)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "a.yaml").write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "b.yaml")


def test_to_dict_is_plain():
    d = to_dict(from_dict({"augment": {"crop_scale": (0.3, 1.0)}}))
    assert d["augment"]["crop_scale"] == [0.3, 1.0] and isinstance(d["augment"]["crop_scale"], list)
