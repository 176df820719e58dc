"""CUDA checks: mixed-precision training steps, resume on the GPU, GPU features against CPU features,
and the mask generator on the GPU. Run them on a machine with a GPU: ``pytest -m cuda tests/test_cuda.py``
(``benchmarks/gpu_check.sh`` does, with the rest of the device checks). Everywhere else they skip with a reason,
so ``make test`` (``-m "not slow"``) passes on a CPU-only machine.
"""
from __future__ import annotations

import json
import os

# cuBLAS is deterministic only with a fixed workspace; it reads this when it first starts, so set it before any
# test touches the GPU (resume must repeat the uninterrupted run bit for bit).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from offset_cir import ModelConfig, build_model  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# Unit roundoff of each compute precision (half the distance from 1 to the next number).
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -9, "fp16": 2.0 ** -11}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 in "fp32" (its unit roundoff is fp16's, 2^-11): the comparisons below assume real fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _batch(model, b, device):
    s = model.preprocess.image_size
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(b, 3, s, s, generator=g).to(device) for k in ("ref_images", "ref_masks", "tgt_images", "tgt_masks")}
    x["texts"] = ["make it red", "same but striped and larger", "x", "smaller, with long sleeves"][:b]
    return x


# ------------------------------------------------------------------------------ mixed-precision training steps
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("backbone", ["tiny", "ViT-B-16"])
def test_mixed_precision_training_steps(backbone, precision):
    # The release trains in fp16 autocast with a grad scaler (docs/model.md#training); bf16 needs none. Three AdamW steps
    # from random initialisation: every loss finite, every weight finite, the weights moved.
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone)).cuda().train()
    x = _batch(model, 4, "cuda")
    opt = torch.optim.AdamW(model.parameter_groups(1e-5, 1e-4))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    before = model.image_fc.weight.detach().clone()
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=DTYPES[precision]):
            loss = model.compute_loss(**x)["total"]
        losses.append(float(loss))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(np.isfinite(losses)), losses
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if scaler is not None:  # a skipped step (inf/NaN gradients) leaves the weights alone: at least one step ran
        assert scaler.get_scale() > 0
    assert not torch.equal(model.image_fc.weight.detach(), before)


# ------------------------------------------------------------------------------ resume on the GPU
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from offset_cir.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth") / "bench"
    generate(root, seed=3, image_size=64, n_train=32, n_val=8, n_test=8)
    return root


def _cfg(root, out, *extra):
    from offset_cir.train.config import load_config

    return load_config("synthetic", [
        f"data.root={root}", f"out_dir={out}", "batch_size=8", "epochs=50", "eval_every_epochs=0",
        "early_stop_patience=null", "tensorboard=false", "optim.decay_epochs_1based=[2]", "log_every_steps=1",
        "device=cuda", *extra])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_equals_uninterrupted_on_cuda(synth_root, tmp_path, precision):
    # As tests/train/test_trainer.py on the CPU: an interrupted run resumed from last/ ends with the very weights of the
    # uninterrupted one (fp16: the grad scaler's state travels with the checkpoint). Deterministic kernels only.
    from safetensors.torch import load_file

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from offset_cir.testing.training import stop_after
    from offset_cir.train.trainer import Trainer

    # The math SDPA backend: the memory-efficient / flash backwards are not deterministic, and warn_only=True
    # would only warn about them; "bit for bit" is a fair demand of deterministic kernels only.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            full = Trainer(_cfg(synth_root, tmp_path / "full", "max_steps=6", f"precision={precision}"),
                           progress=False).fit()
            part = Trainer(_cfg(synth_root, tmp_path / "part", "max_steps=6", f"precision={precision}"),
                           progress=False, callbacks=[stop_after(3)]).fit()
            assert full["steps"] == 6 and part["steps"] == 3
            resumed = Trainer(None, resume=tmp_path / "part", progress=False).fit()
            assert resumed["steps"] == 6
    finally:
        torch.use_deterministic_algorithms(False)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, sorted(differ.items(), key=lambda kv: -kv[1])[:5]
    state = json.loads((tmp_path / "part" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 6


# ------------------------------------------------------------------------------ GPU features against CPU features
def _features(model, x, device, precision):
    model = model.to(device).eval()
    xd = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
    ctx = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device, enabled=False)
    with torch.no_grad(), ctx:
        q = model.encode_query(xd["ref_images"], xd["ref_masks"], xd["texts"])
        k = model.encode_target(xd["tgt_images"], xd["tgt_masks"])
    return torch.cat([q, k]).double().cpu()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backbone", ["tiny", "small"])
def test_eval_features_on_cuda_match_cpu(backbone, precision):
    # Rounding error is linear in the unit roundoff u of the compute precision: features err by A * u, where A is
    # this network's amplification of rounding (its depth, widths and conditioning), the same on any device to first
    # order; only the order of the sums differs between kernels. So measure A * u on the CPU at the same precision
    # against a float64 reference (on 2 CPU cores: A ~ 2 for tiny and small, in fp32 and bf16 alike) and let the GPU
    # err by at most sqrt(n) times that, n the widest reduction (largest fan-in) of the model: 256 for tiny, 768 for
    # small, its patch embedding (another summation order of n terms errs within ~sqrt(n) of a given one); never
    # less than sqrt(n) u.
    # A device bug (a lost mask, a layout mix-up, a wrong dtype cast) moves the unit-norm features by O(0.1-1),
    # beyond the bf16 bound (<= 0.08) and far beyond fp32's (<= 4e-6).
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone))
    x = _batch(model, 4, "cpu")
    x64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in x.items()}
    ref = _features(_double_copy(model), x64, "cpu", "fp32")
    cpu = _features(model, x, "cpu", precision)
    gpu = _features(model, x, "cuda", precision)
    err_cpu = float((cpu - ref).abs().max())
    err_gpu = float((gpu - ref).abs().max())
    u = UNIT_ROUNDOFF[precision]
    fan_in = max(p[0].numel() for n, p in model.named_parameters() if p.dim() >= 2 and "token_embedding" not in n)
    assert err_gpu <= fan_in ** 0.5 * max(err_cpu, u), (err_gpu, err_cpu, u, fan_in)
    assert err_cpu < 0.1  # the reference itself is sane: the CPU at this precision is close to float64


def _double_copy(model):
    twin = build_model(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.double()


# ------------------------------------------------------------------------------ mask generator on the GPU
@pytest.fixture(scope="module")
def tiny_mask_models(tmp_path_factory):
    from offset_cir.testing.masks import build_tiny_blip, build_tiny_clipseg

    base = tmp_path_factory.mktemp("tiny_mask_models")
    return build_tiny_blip(base / "blip"), build_tiny_clipseg(base / "clipseg")


def test_mask_generator_on_cuda(tiny_mask_models):
    # The tiny random BLIP and CLIPSeg folders through the same path as a user's models: on the GPU in float32 the
    # 8-bit masks equal the CPU's up to one grey level (rounding at a quantisation edge); in the GPU's default
    # half precision they are still masks of the right size and mode.
    from PIL import Image

    from offset_cir.masks.generator import MaskGenerator

    blip, clipseg = tiny_mask_models
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for h, w in ((48, 64), (80, 40))]
    captions = ["a red dress", "blue striped shirt"]
    cpu = MaskGenerator(captioner=None, segmenter=str(clipseg), device="cpu", dtype="float32")(images, captions)
    gpu = MaskGenerator(captioner=None, segmenter=str(clipseg), device="cuda", dtype="float32")(images, captions)
    for a, b, im in zip(cpu, gpu, images):
        assert a.size == b.size == im.size and b.mode == "L"
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    gen = MaskGenerator(captioner=str(blip), segmenter=str(clipseg), device="cuda", dtype="auto", batch_size=2)
    masks, caps = gen.generate(images)
    assert [m.size for m in masks] == [im.size for im in images] and all(m.mode == "L" for m in masks)
    assert all(isinstance(c, str) for c in caps)
