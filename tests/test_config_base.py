"""The one config base: fields declared with what they mean, read with pydantic (errors name the field, the value,
the type expected and the file), legacy names, JSON out, and the one ``key=value`` reader."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from offset_cir.config_base import ConfigError, parse_overrides
from offset_cir.model.config import ModelConfig
from offset_cir.train.config import DataConfig, OptimConfig, TrainConfig


@pytest.mark.parametrize("data, message", [
    ({"optim": {"betas": [0.9]}}, 'field optim.betas is [0.9] (list); expected a list of 2 numbers'),
    ({"data": {"clipseg_maps": "squash"}}, "field data.clipseg_maps is \"squash\" (str); expected one of 'release', "
                                           "'aligned' or null"),
    ({"model": {"tfm_heads": True}}, "field model.tfm_heads is true (bool); expected an integer"),
    ({"data": {"settings": [1]}}, "field data.settings is [1] (list); expected a mapping"),
    ({"optim": 3}, "field optim is 3 (int); expected a mapping of OptimConfig fields"),
    ({"data": {"colour": 1}}, "unknown config keys ['data.colour']; known: ['clipseg_maps', 'dataset'"),
    ({"model": {"focus_channels": 0}}, "model: ModelConfig.focus_channels must be >= 1"),
])
def test_errors_name_the_field_the_value_the_type_and_the_file(data, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(data, source="runs/x/config.yaml")
    assert str(err.value).startswith("runs/x/config.yaml: ") and message in str(err.value)


def test_values_of_json_and_yaml_kinds_are_accepted_and_written_back_the_same():
    cfg = TrainConfig.from_dict({"optim": {"betas": [0.8, 0.99], "new_lr": 1}, "model": {"mu": 1},
                                 "data": {"settings": {"categories": "dress"}}})
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.new_lr == 1.0 and cfg.model.mu == 1
    out = cfg.to_dict()
    assert out["optim"]["betas"] == [0.8, 0.99]  # JSON values: what config.json and config.yaml hold
    assert TrainConfig.from_dict(out) == cfg


def test_old_names_are_read_as_the_new_ones_and_a_converted_value_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="offset_cir.config_base"):
        cfg = TrainConfig.from_dict({"optim": {"decay_epochs": [5, 10]}, "model": {"tfm": False}}, source="old.yaml")
    # decay_epochs counts epochs from 0: read as the same schedule counted from 1
    assert cfg.optim.decay_epochs_1based == [6, 11] and cfg.model.use_tfm is False
    assert "old.yaml: optim: decay_epochs=[5, 10] is read as decay_epochs_1based=[6, 11]" in caplog.text
    with pytest.raises(ConfigError, match="both 'decay_epochs' .* and 'decay_epochs_1based'"):
        OptimConfig.from_dict({"decay_epochs": [1], "decay_epochs_1based": [2]})


def test_every_field_says_what_it_means_in_the_docstring():
    for cls in (ModelConfig, TrainConfig, DataConfig, OptimConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name}"
            assert f"    {f.name} (" in cls.__doc__, f"{cls.__name__}.{f.name}"
    assert "The authors' release: [5, 10]" in OptimConfig.__doc__
    with pytest.raises(ConfigError, match=r"DataConfig.clipseg_maps='squash': expected one of 'release', 'aligned' "
                                          r"or null"):
        DataConfig(clipseg_maps="squash")  # choices hold however a config is built
    assert OptimConfig().learning_rates(5) == pytest.approx((1e-6, 1e-5))
    with pytest.raises(ValueError, match="epochs count from 1"):
        OptimConfig().lr_factor(0)


def test_one_reader_of_key_value_items():
    from argparse import Namespace

    from offset_cir.commands.eval import dataset_settings

    items = ["model.backbone=tiny", "optim.new_lr=3e-4", "optim.betas=[0.8, 0.99]", "max_steps=null",
             "name=", "use-masks=false", "categories=dress,shirt"]
    assert parse_overrides(items) == {"model": {"backbone": "tiny"}, "optim": {"new_lr": 3e-4, "betas": [0.8, 0.99]},
                                      "max_steps": None, "name": "", "use_masks": False,
                                      "categories": "dress,shirt"}
    # offset eval / doctor / submit --set reads its items the same way
    args = Namespace(set=["use-masks=false", "categories=dress,shirt", "correction_dicts=none"])
    assert dataset_settings(args) == {"use_masks": False, "categories": "dress,shirt", "correction_dicts": "none"}
    for bad in ("batch_size", "=3"):
        with pytest.raises(ConfigError, match="expected key=value"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="used as a section"):
        parse_overrides(["optim=1", "optim.eps=2"])
