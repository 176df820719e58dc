"""The table of protocols (offset_cir.eval.protocols), and where it is listed."""
from __future__ import annotations

import dataclasses

import pytest

from offset_cir.cli import main
from offset_cir.data import dataset_class, list_datasets
from offset_cir.errors import UserInputError
from offset_cir.eval.protocols import (
    PROTOCOLS, Protocol, get_protocol, list_protocols, protocol_for, protocol_splits, register_protocol,
)


def test_every_protocol_fits_registered_benchmarks_and_every_benchmark_has_its_default():
    assert list_protocols() == ["fashioniq", "fashioniq-union", "fashioniq-full", "shoes", "cirr-val", "synthetic",
                                "fashion200k-tirg", "circo-val", "circo-val-noref"]
    for name in list_protocols():
        assert set(get_protocol(name).datasets) <= set(list_datasets()), name
    for name in list_datasets():
        klass = dataset_class(name)
        assert klass.name in get_protocol(klass.default_protocol).datasets, name
    assert get_protocol("circo") is get_protocol("circo-val") and get_protocol("cirr").name == "cirr-val"
    circo, noref = get_protocol("circo-val"), get_protocol("circo-val-noref")
    assert (circo.exclude_reference, noref.exclude_reference) == (False, True)
    assert dataclasses.replace(circo, name="x", exclude_reference=True, description="") == \
        dataclasses.replace(noref, name="x", description="")  # the variant differs by that one setting
    with pytest.raises(UserInputError, match="unknown protocol 'nope'"):
        get_protocol("nope")


def test_protocol_for_a_benchmark_and_the_splits_doctor_needs(shared_data):
    from offset_cir.data import get_dataset

    bench = get_dataset("circo", shared_data / "circo")
    assert protocol_for(None, bench).name == "circo-val"
    with pytest.raises(UserInputError, match="protocol cirr-val is for cirr or synthetic, not circo"):
        protocol_for("cirr-val", bench)
    assert protocol_splits(bench) == {"val": ["circo-val", "circo-val-noref"]}


def test_register_a_protocol(monkeypatch):
    from offset_cir.eval import protocols

    monkeypatch.setattr(protocols, "PROTOCOLS", dict(PROTOCOLS))  # this test's additions go with it
    monkeypatch.setattr(protocols, "ALIASES", dict(protocols.ALIASES))
    extra = Protocol("circo-val-r100", ("circo",), "val", ("all",), (100,), metric="map")
    assert register_protocol(extra, aliases=("circo100",)) is extra
    assert get_protocol("circo100") is extra and list_protocols()[-1] == "circo-val-r100"
    with pytest.raises(ValueError, match="already registered"):
        register_protocol(dataclasses.replace(extra, name="cirr"))
    with pytest.raises(ValueError, match="metric must be one of"):
        Protocol("x", ("circo",), "val", ("all",), (5,), metric="ndcg")


def test_offset_info_lists_datasets_and_protocols(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "datasets: fashioniq, shoes, cirr, fashion200k, circo, synthetic" in out
    assert "protocols: " + ", ".join(list_protocols()) in out
