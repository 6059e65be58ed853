"""Config loading: YAML + overrides, strict keys and types, validation before any work."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from arc_dist.config import DistillJobConfig, describe, load_config
from arc_dist.errors import ConfigError

BASE = {"teacher": {"path": "/t"}, "data": {"path": "/c"}}


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(DistillJobConfig, write(tmp_path, {**BASE, "train": {"steps": 7}}),
                      ["train.steps=9", "optim.lr=1e-4", "student.intermediate=null", "teacher.layer=-2"])
    assert cfg.train.steps == 9 and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.student.intermediate is None and cfg.teacher.layer == -2
    assert cfg.student.layers == 3  # untouched default


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stesp=3"], "unknown config key 'train.stesp'; did you mean 'train.steps'"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.steps=many"], "train.steps='many' must be an integer"),
        (["train.steps=0"], "train.steps=0 must be >= 1"),
        (["train.precision=fp16"], "choose one of"),
        (["student.heads=5"], "student.heads=5 must divide student.hidden=384"),
        (["teacher.layer=0"], "teacher.layer=0 is invalid"),
        (["optim.lr=2"], "optim.lr=2.0 must be in"),
        (["loss.relation_heads=0"], "loss.relation_heads=0"),
        (["teacher.path="], "teacher.path is required"),
        (["checkpoint.resume=yesterday"], "checkpoint.resume='yesterday'"),
        (["train.steps"], "must look like section.key=value"),
        (["train=3"], "section train must be a mapping"),
        (["loss.weight_qq=0", "loss.weight_kk=0", "loss.weight_vv=0"], "all 0"),
        (["metrics.progress_bar=maybe"], "must be true or false"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(DistillJobConfig, write(tmp_path, BASE), overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DistillJobConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DistillJobConfig, bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(DistillJobConfig, bad)


def test_every_leaf_is_documented():
    rows = describe(DistillJobConfig)
    assert len(rows) > 30
    for key, _, text in rows:
        assert text, f"config key {key} has no help text"


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = sorted(root.glob("distill_*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(DistillJobConfig, path, ["teacher.path=/x", "data.path=/y"])
        assert dataclasses.is_dataclass(cfg)


# Property-based: whatever a user writes, the loader either builds a config or raises ConfigError.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arc_dist.config import CompressJobConfig, FinetuneJobConfig  # noqa: E402

_keys = st.sampled_from([k for cls in (DistillJobConfig, CompressJobConfig) for k, _, _ in describe(cls)]
                        + ["train", "nope", "train.nope", "loss.relation_heads.x", ""])
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 30), max_size=4))
_yaml_text = st.one_of(st.text(max_size=200),
                       st.dictionaries(st.sampled_from(["train", "student", "loss", "data", "x"]),
                                       st.dictionaries(st.text(max_size=8), _values, max_size=3), max_size=3)
                       .map(yaml.safe_dump))


@settings(max_examples=300, deadline=None)
@given(cls=st.sampled_from([DistillJobConfig, CompressJobConfig, FinetuneJobConfig]),
       text=_yaml_text, pairs=st.lists(st.tuples(_keys, _values), max_size=4))
def test_fuzz_loader_loads_or_raises_config_error(tmp_path_factory, cls, text, pairs):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    try:
        load_config(cls, path, overrides)
    except ConfigError:
        pass


def test_readme_config_reference_is_current():
    from pathlib import Path

    from arc_dist.config import README_MARKERS, reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(README_MARKERS[0])[1].split(README_MARKERS[1])[0].strip()
    assert section == reference_markdown(), "README's config reference is stale: run python -m arc_dist.config"
