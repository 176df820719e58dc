"""``load_encoder``'s training-free baseline branch: built on torch from its spec; the ONNX options refused."""
from __future__ import annotations

import pytest

from offset_cir.errors import UserInputError
from offset_cir.export.runtime import load_encoder
from offset_cir.model.baseline import BaselineEncoder, BaselineSpec


def test_a_baseline_spec_gives_its_encoder_on_torch():
    spec = BaselineSpec("image+text", backbone="tiny")
    encoder = load_encoder(baseline=spec, device="cpu")
    assert isinstance(encoder, BaselineEncoder) and encoder.spec == spec
    assert str(encoder.device) == "cpu" and not encoder.uses_masks


@pytest.mark.parametrize("kwargs", [dict(runtime="onnx"), dict(onnx_dir="export"), dict(int8=True)])
def test_onnx_options_are_refused_for_a_baseline(kwargs):
    with pytest.raises(UserInputError, match="torch runtime only.*--runtime onnx, --onnx and --int8"):
        load_encoder(baseline=BaselineSpec("image", backbone="tiny"), **kwargs)


def test_a_baseline_takes_no_checkpoint_besides():
    with pytest.raises(UserInputError, match="names its backbone itself"):
        load_encoder("runs/x/best", baseline=BaselineSpec("image", backbone="tiny"))
