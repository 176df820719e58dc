"""The backbone registry: one table for the package's own backbones (package configurations and packaged ones),
read by create_clip, make_tokenizer, the packaged module and `offset info`; OpenCLIP names resolve through OpenCLIP."""
from __future__ import annotations

import argparse

import pytest
import torch

from offset_cir.errors import UserInputError
from offset_cir.model import backbone as bb
from offset_cir.model import towers
from offset_cir.model import packaged
from offset_cir.model.registry import (BackboneEntry, backbone_family, get_backbone_entry, is_registered,
                                       list_backbones, register_backbone, unregister_backbone)


@pytest.fixture
def scratch_name():
    name = "test-registry-backbone"
    yield name
    if is_registered(name):
        unregister_backbone(name)


def test_the_package_backbones_are_entries_of_one_registry():
    own = list_backbones()
    assert {"tiny", "small", "efficientnet-lite0-minilm"} <= set(own) and own == sorted(own)
    tiny, eff = get_backbone_entry("tiny"), get_backbone_entry("efficientnet-lite0-minilm")
    assert isinstance(tiny, BackboneEntry) and tiny.family == "package config (random init)"
    assert not tiny.offline_weights and tiny.config["vision_cfg"]["image_size"] == 64
    assert eff.offline_weights and eff.family.startswith("packaged pretrained") and eff.tokenizer is not None
    # the tables the package reads are views of the same entries
    assert towers.PACKAGE_BACKBONES["tiny"] is tiny.config
    assert packaged.PACKAGED_BACKBONES["efficientnet-lite0-minilm"] is eff.config
    assert set(towers.PACKAGE_BACKBONES) == {"tiny", "small"} and set(packaged.PACKAGED_BACKBONES) == {eff.name}


def test_openclip_names_resolve_through_openclip_and_are_listed_on_request():
    assert not is_registered("ViT-B-16") and "ViT-B-16" not in list_backbones()
    everything = list_backbones(open_clip=True)
    assert everything[:len(list_backbones())] == list_backbones() and "ViT-B-16" in everything
    assert backbone_family("ViT-B-16") == "OpenCLIP ViT" and backbone_family("no-such-model") is None
    with pytest.raises(UserInputError, match="'ViT-B-16' is not registered; registered: .*tiny"):
        get_backbone_entry("ViT-B-16")


def test_a_registered_factory_builds_the_backbone_and_its_tokenizer(scratch_name):
    built = []

    def tokenizer(name, context_length):
        return ("tokenizer of", name, context_length)

    @register_backbone(scratch_name, family="test family", summary="the tiny config under another name",
                       tokenizer=tokenizer)
    def create(name, pretrained):
        built.append((name, pretrained))
        return towers.build_clip_from_config(towers.PACKAGE_BACKBONES["tiny"])

    assert is_registered(scratch_name) and scratch_name in list_backbones()
    backbone = bb.Backbone(scratch_name)
    assert built == [(scratch_name, None)] and backbone.family == "test family"
    assert backbone.dims.image_size == 64
    assert towers.make_tokenizer(scratch_name, 8) == ("tokenizer of", scratch_name, 8)
    with pytest.raises(UserInputError, match="registered already"):
        register_backbone(scratch_name, family="f", summary="s")(create)
    register_backbone(scratch_name, family="other", summary="s", replace=True)(create)
    assert get_backbone_entry(scratch_name).family == "other"


def test_a_package_configuration_added_through_its_table_builds_and_leaves(scratch_name):
    cfg = {**towers.PACKAGE_BACKBONES["tiny"], "embed_dim": 24}
    towers.PACKAGE_BACKBONES[scratch_name] = cfg
    try:
        assert get_backbone_entry(scratch_name).family == "package config (random init)"
        torch.manual_seed(0)
        assert bb.Backbone(scratch_name).dims.embed_dim == 24
    finally:
        del towers.PACKAGE_BACKBONES[scratch_name]
    assert not is_registered(scratch_name)
    with pytest.raises(KeyError):
        packaged.PACKAGED_BACKBONES["tiny"]  # a view holds only its own factory's entries


def test_offset_info_prints_each_registered_backbone(capsys):
    from offset_cir.commands import info

    assert info.run(argparse.Namespace(all_backbones=False, deviations=False)) == 0
    out = capsys.readouterr().out
    for name in list_backbones():
        entry = get_backbone_entry(name)
        assert f"  {name}: {entry.family}; {entry.summary}" in out
    assert "efficientnet-lite0-minilm" in out and "pretrained weights install offline" in out
