"""One table of every setting where offset-cir can depart from the authors' release, read from the config fields'
own metadata: ``offset info --deviations`` prints it, docs/deviations.md carries the same text, and a setting known
to depart from the release that has no entry fails here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from offset_cir.config_base import setting
from offset_cir.train.deviations import deviation_table, deviations, marked_fields

DOCS = Path(__file__).resolve().parents[2] / "docs"

# Every place where offset-cir can differ from the release, as read in the release's train.py and datasets.py
# and in the model's documented readings (D1, D4, D10, D11, D14, A1): each must carry the release's value.
KNOWN = {
    "model.focus_channels_local", "model.gate_split", "model.tfm_attention", "model.global_token",
    "model.text_padding", "model.shared_crop", "data.clipseg_maps", "optim.decay_epochs_1based",
    "keep_partial_batch", "early_stop_patience", "save_best", "precision", "loss_precision", "freeze_backbone",
    "feature_cache",
}


def _docs_table() -> str:
    text = (DOCS / "deviations.md").read_text()
    match = re.search(r"<!-- deviations:start -->\n(.*)\n<!-- deviations:end -->", text, re.S)
    assert match, "docs/deviations.md has no table between its markers"
    return match.group(1)


def test_every_known_departure_has_an_entry_with_the_release_value_and_what_it_changes():
    marked = marked_fields()
    assert KNOWN <= set(marked), f"no entry for {sorted(KNOWN - set(marked))}"
    rows = {r.setting: r for r in deviations()}
    assert set(rows) == set(marked)
    for name, row in rows.items():
        assert row.changes.strip(), name
        assert f"| `{name}` |" in _docs_table(), f"docs/deviations.md has no entry for {name}"


def test_docs_carry_the_table_the_command_prints(capsys):
    from offset_cir.cli import main

    assert _docs_table() == deviation_table()
    assert main(["info", "--deviations"]) == 0
    assert capsys.readouterr().out.strip() == deviation_table()


def test_the_table_says_which_settings_the_release_presets_reproduce():
    rows = {r.setting: r for r in deviations()}
    # the presets train as the release trains, except best/, kept on purpose where the release keeps none
    assert {name for name, r in rows.items() if not r.presets_reproduce} == {"save_best"}
    assert rows["save_best"].presets_differ == {"fashioniq": True, "shoes": True, "fashion200k": True}
    assert (rows["keep_partial_batch"].release, rows["keep_partial_batch"].default) == (True, False)
    assert (rows["optim.decay_epochs_1based"].release, rows["early_stop_patience"].release) == ([5, 10], 4)


def test_a_departure_cannot_be_marked_without_saying_what_it_changes():
    with pytest.raises(TypeError, match="says what another value changes"):
        setting(1, "a number", release=2)
    with pytest.raises(TypeError, match="says what it means"):
        setting(1)


def test_training_doc_says_what_precision_auto_does():
    import torch

    from offset_cir.train.precision import training_precision

    text = " ".join((DOCS / "training.md").read_text().split())
    sentence = text[text.index("`precision=auto` is"):].split(";")[0]
    assert "fp16 autocast with a grad scaler on CUDA" in sentence and "bf16" not in sentence
    assert training_precision("auto", torch.device("cuda", 0)) == "fp16"  # what the code does
