"""The encoder's precision (offset_cir.export.precision): bf16 features against fp32 ones within bounds derived from
bf16's rounding, and ``auto``'s choice (timing monkeypatched).

bf16 keeps 8 significant bits: each rounding to bf16 has a relative error of at most u = 2^-8.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offset_cir
from offset_cir.errors import UserInputError
from offset_cir.export import precision as P
from offset_cir.export.precision import Bf16Encoder, PrecisionChoice, calibrate, use_precision

torch.set_num_threads(1)
U = 2.0 ** -8  # unit roundoff of bfloat16


class FourPixels:
    """Preprocessing to 4 x 4 pixels in [0, 1]."""

    image_size = 4

    def image(self, pil, train=False):
        pil = pil.convert("RGB").resize((4, 4))
        return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def mask(self, pil, train=False):
        return self.image(pil.convert("RGB"))


class LinearEncoder(torch.nn.Module):
    """Features = W x (no bias, nothing after it): the simplest model whose bf16 error can be bounded exactly."""

    def __init__(self, n_in=48, dim=16, seed=0, spread=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(n_in, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, n_in, generator=g) * spread)
        self.embed_dim = dim
        self.uses_query_mask = self.uses_target_mask = False
        self.preprocess = FourPixels()

    def encode_query(self, images, masks, texts):
        return self.proj(images.flatten(1))

    def encode_target(self, images, masks=None):
        return self.proj(images.flatten(1))


def test_bf16_of_one_linear_layer_is_within_its_rounding_bound():
    """y = W x in bf16: x and W are rounded (1 + d, |d| <= u each), the products summed in float32 (relative error
    below n 2^-24) and the sum rounded (another u), so |y_bf16 - y| <= ((1+u)^3 (1 + n 2^-24) - 1) (|W| |x|)
    componentwise, and the cosine of y_bf16 with y is at least sqrt(1 - r^2), r = ||bound|| / ||y||."""
    model = LinearEncoder()
    x = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    enc = Bf16Encoder(model, PrecisionChoice("bf16", "bf16", "test"))
    with torch.no_grad():
        exact = x.flatten(1).double() @ model.proj.weight.double().T
        raw = enc.model.encode_query(x.to(torch.bfloat16), None, None).double()
        got = enc.encode_query(x, None, None)  # float32, renormalised
        n = x.flatten(1).shape[1]
        bound = ((1 + U) ** 3 * (1 + n * 2.0 ** -24) - 1) * (x.flatten(1).double().abs() @ model.proj.weight.double().abs().T)
    assert got.dtype == torch.float32 and torch.allclose(got.norm(dim=-1), torch.ones(32))
    assert bool(((raw - exact).abs() <= bound).all())
    r = bound.norm(dim=-1) / exact.norm(dim=-1)
    cos = F.cosine_similarity(got.double(), exact, dim=-1)
    assert bool((cos >= torch.sqrt(1 - r ** 2)).all()), (cos.min(), r.max())
    # the bound is tight enough to mean something: the error is more than a float32 rounding's
    assert float((raw - exact).abs().max()) > 2.0 ** -24 * float(exact.abs().max())


def test_bf16_features_of_the_tiny_offset_agree_with_fp32():
    """The tiny OFFSET rounds about K <= 100 intermediate results on its longest path (patch and token embeddings,
    two blocks per tower of layer norm, attention, projections and residual sums; the focus modules). Independent
    roundings add up like sqrt(K) u <= 10 u = 0.039 of the feature's length, so cosine >= sqrt(1 - 0.039^2) =
    0.99924: the test asks for 0.999, the agreement ``auto`` requires."""
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    s = model.preprocess.image_size
    g = torch.Generator().manual_seed(2)
    images, masks = torch.randn(4, 3, s, s, generator=g), (torch.rand(4, 3, s, s, generator=g) > 0.5).float()
    texts = ["make it red", "add stripes", "the same but larger", "on the left, in blue"]
    enc, choice = use_precision(model, "bf16")
    with torch.inference_mode():
        pairs = [(model.encode_query(images, masks, texts), enc.encode_query(images, masks, texts)),
                 (model.encode_target(images, masks), enc.encode_target(images, masks))]
    assert choice.precision == "bf16" and isinstance(enc, Bf16Encoder)
    assert next(enc.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    for fp32, bf16 in pairs:
        cos = F.cosine_similarity(fp32, bf16, dim=-1)
        assert bool((cos >= 0.999).all()), cos
        assert bool((cos < 1 - 1e-9).any())  # it really ran in bf16


def _fake_timing(monkeypatch, fp32_s: float, bf16_s: float):
    """``encode_seconds`` answers ``fp32_s`` for the first pass it times and ``bf16_s`` for the second."""
    answers = iter([fp32_s, bf16_s])
    calls = []

    def fake(encode, repeats=2):
        calls.append(encode)
        return next(answers)

    monkeypatch.setattr(P, "encode_seconds", fake)
    return calls


def test_auto_keeps_fp32_when_bf16_is_not_faster(monkeypatch):
    _fake_timing(monkeypatch, 1.0, 0.95)  # 5 % faster: within the noise margin
    model = LinearEncoder()
    enc, choice = use_precision(model, "auto")
    assert enc is model and choice.precision == "fp32" and choice.requested == "auto"
    assert "not 1.15x faster" in choice.reason and choice.cosine > 0.999


class Cancelling(LinearEncoder):
    """Features W (x + 100) with rows of W summing to 0: the 100 cancels, leaving W x. In bf16, x + 100 is rounded
    to a multiple of 0.5 (bf16's spacing between 64 and 128), which erases x in [0, 1]."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.proj.weight.sub_(self.proj.weight.mean(dim=1, keepdim=True))

    def encode_query(self, images, masks, texts):
        return self.proj(images.flatten(1) + 100.0)

    def encode_target(self, images, masks=None):
        return self.proj(images.flatten(1) + 100.0)


def test_auto_keeps_fp32_when_bf16_disagrees(monkeypatch):
    _fake_timing(monkeypatch, 1.0, 0.2)  # bf16 5x faster, but
    model = Cancelling()
    enc, choice = use_precision(model, "auto")
    assert enc is model and choice.precision == "fp32"
    assert "disagree" in choice.reason and choice.cosine < 0.999


def test_auto_takes_bf16_when_faster_and_in_agreement_once_per_model(monkeypatch):
    calls = _fake_timing(monkeypatch, 1.0, 0.4)
    model = LinearEncoder()
    enc, choice = use_precision(model, "auto")
    assert isinstance(enc, Bf16Encoder) and choice.precision == "bf16" and "2.50x faster" in choice.reason
    assert choice.fp32_seconds == 1.0 and choice.bf16_seconds == 0.4 and choice.cosine >= 0.999
    assert enc.precision == choice and enc.embed_dim == 16  # the model's own attributes show through
    again, second = use_precision(model, "auto")  # the choice is kept for the process: no second calibration
    assert len(calls) == 2 and second == choice and isinstance(again, Bf16Encoder)
    assert "bf16 is 2.50x faster" in choice.describe() and "cosine" in choice.describe()


def test_real_calibration_measures_both_and_reports_the_cosine():
    torch.manual_seed(0)
    model = offset_cir.build_model(offset_cir.ModelConfig(backbone="tiny")).eval()
    choice = calibrate(model, repeats=1)
    assert choice.precision in ("fp32", "bf16") and choice.requested == "auto"
    assert choice.fp32_seconds > 0 and choice.bf16_seconds > 0 and 0.999 <= choice.cosine <= 1.0


def test_precision_names_and_onnx_runtime():
    model = LinearEncoder()
    with pytest.raises(UserInputError, match="precision must be one of"):
        use_precision(model, "fp16")
    assert use_precision(model, "fp32") == (model, PrecisionChoice("fp32", "fp32", "asked for"))

    class OnnxLike:
        runtime = "onnx"

    onnx = OnnxLike()
    with pytest.raises(UserInputError, match="onnxruntime runs the exported float32 graphs"):
        use_precision(onnx, "bf16")
    enc, choice = use_precision(onnx, "auto")
    assert enc is onnx and choice.precision == "fp32"
    assert math.isclose(P.MIN_COSINE, 0.999)
