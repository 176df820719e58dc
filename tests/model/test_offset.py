"""OFFSET model: shapes, gradients, ablations, variants and the backbone contract (docs/model.md)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from offset_cir import ABLATIONS, ModelConfig, build_model
from offset_cir.model.focus import FocusRevision, TextualFocusMapping

BACKBONES = ["tiny", "small"]
VARIANTS = {
    "default": {},
    "per_token": {"gate_split": "per_token"},
    "separate_P": {"focus_channels": 3, "focus_channels_local": 5},
    "tfm_tokens": {"tfm_attention": "tokens"},
    "global_mean": {"global_token": "mean"},
    "text_pad_mask": {"text_padding": "mask"},
    "unbatched_encoder": {"batch_encoder_calls": False},
}

# float64 rounding of a few chained maps of width <= 100 with O(1) values stays below 1e3 * eps64 ~ 2e-13; a
# formula or layout error is O(1). Checking formulas in float64 keeps the tolerance independent of a machine's kernels.
F64_TOL = dict(rtol=1e-10, atol=1e-10)


def _inputs(model, b=3):
    s = model.preprocess.image_size
    return dict(
        ref_images=torch.randn(b, 3, s, s),
        ref_masks=torch.randn(b, 3, s, s),
        texts=["make it red", "same but striped and larger", ""][:b],
        tgt_images=torch.randn(b, 3, s, s),
        tgt_masks=torch.randn(b, 3, s, s),
    )


def _expected_tokens(cfg: ModelConfig, target: bool) -> int:
    if not cfg.use_focus_projection or (target and not cfg.use_target_focus_projection):
        return 2
    return cfg.p_global + cfg.p_local


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    return request.param


@pytest.mark.parametrize("name", ["none", *ABLATIONS])
def test_ablation_shapes_and_losses(backbone, name):
    cfg = ModelConfig(backbone=backbone)
    if name != "none":
        cfg = cfg.with_ablation(name)
    model = build_model(cfg)
    x = _inputs(model)
    d = model.embed_dim
    assert d == {"tiny": 32, "small": 48}[backbone]
    q = model.encode_query(x["ref_images"], x["ref_masks"], x["texts"])
    k = model.encode_target(x["tgt_images"], x["tgt_masks"])
    assert q.shape == k.shape == (3, d)
    # |norm - 1| of a float32 L2-normalised vector of d terms: at most (d + 2) rounding steps of eps32
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3), rtol=0, atol=(d + 2) * torch.finfo(torch.float32).eps)
    assert model.query_tokens(x["ref_images"], x["ref_masks"], x["texts"]).shape[1] == _expected_tokens(model.config, False)
    assert model.target_tokens(x["tgt_images"], x["tgt_masks"]).shape[1] == _expected_tokens(model.config, True)
    losses = model.compute_loss(**x)
    assert set(losses) == {"total", "bbc", "fr"} and torch.isfinite(losses["total"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_shapes(backbone, variant):
    model = build_model(ModelConfig(backbone=backbone, **VARIANTS[variant]))
    x = _inputs(model)
    out = model.compute_loss(**x)
    out["total"].backward()
    ft = model.target_tokens(x["tgt_images"], x["tgt_masks"])
    assert ft.shape == (3, _expected_tokens(model.config, True), model.embed_dim)


def test_wo_fm_needs_no_masks():
    model = build_model(ModelConfig().with_ablation("wo_fm"))
    assert not model.uses_masks and not model.uses_query_mask and not model.uses_target_mask
    x = _inputs(model)
    x["ref_masks"] = x["tgt_masks"] = None
    model.compute_loss(**x)["total"].backward()
    with pytest.raises(ValueError, match="masks are required"):
        build_model(ModelConfig()).encode_target(x["tgt_images"], None)


# Parameters of the backbone that OFFSET never uses (CLIP's own contrastive temperature).
UNUSED_BACKBONE = ("backbone.clip.logit_scale", "backbone.clip.logit_bias")
# Which new-module prefixes each ablation removes from the graph.
REMOVED = {
    "wo_fm": {"vfm.", "tfm."},
    "wo_vfm": set(),  # the target branch still uses VFM
    "wo_tfm": {"tfm."},
    "wo_mgfp": {"visual_projection.", "text_projection."},
    "wo_target_vfm": set(),
    "wo_target_mgfp": set(),
    "wo_revision": {"revision."},
    "wo_bbc": {"logit_scale"},
    "wo_fr": set(),
}
ALL_NEW = {"vfm.", "tfm.", "visual_projection.", "text_projection.", "revision.", "logit_scale", "image_fc.", "text_fc."}


@pytest.mark.parametrize("name", ["none", *ABLATIONS])
def test_every_parameter_gets_a_gradient(name):
    cfg = ModelConfig() if name == "none" else ModelConfig().with_ablation(name)
    model = build_model(cfg)
    model.compute_loss(**_inputs(model))["total"].backward()
    names = {n for n, _ in model.named_parameters()}
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0)))
    assert no_grad == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == [n for n in UNUSED_BACKBONE if n in names]
    present = {prefix for prefix in ALL_NEW if any(n.startswith(prefix) for n in names)}
    assert present == ALL_NEW - REMOVED.get(name, set())


def test_gradient_reaches_mask_only_where_used():
    # w/o Target_VFM: the target mask must not influence the target feature at all.
    model = build_model(ModelConfig().with_ablation("wo_target_vfm"))
    x = _inputs(model)
    k1 = model.encode_target(x["tgt_images"], None)
    k2 = model.encode_target(x["tgt_images"], x["tgt_masks"])
    torch.testing.assert_close(k1, k2)
    # default: the target mask changes the target feature
    model = build_model(ModelConfig())
    k1 = model.encode_target(x["tgt_images"], x["tgt_masks"])
    k2 = model.encode_target(x["tgt_images"], torch.randn_like(x["tgt_masks"]))
    assert not torch.allclose(k1, k2)


# ------------------------------------------------------------------ losses
def _slow_bbc(q, k, s):
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(s * (q[i] @ k[j])) for j in range(k.shape[0])]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        total += lse - logits[i]
    return total / q.shape[0]


def _slow_fr(q, k, ft, tau):
    b = q.shape[0]
    teacher = []
    for i in range(b):
        toks = [ft[i, j] / ft[i, j].norm() for j in range(ft.shape[1])]
        flat = torch.cat(toks)
        teacher.append(flat / flat.norm())
    total = 0.0
    for i in range(b):
        tp = [math.exp(float(teacher[i] @ teacher[j]) / tau) for j in range(b)]
        tq = [math.exp(float(q[i] @ k[j]) / tau) for j in range(b)]
        p = [v / sum(tp) for v in tp]
        qq = [v / sum(tq) for v in tq]
        total += sum(p[j] * (math.log(p[j]) - math.log(qq[j])) for j in range(b))
    return total / b


def test_losses_against_slow_reference(monkeypatch):
    model = build_model(ModelConfig(mu=0.5, tau=0.1, logit_scale_init=7.0))
    b, d = 4, model.embed_dim
    q = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).float()
    k = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).float()
    ft = torch.randn(b, 8, d)
    q.requires_grad_(True)
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **kw: (q, k, ft))
    out = model.compute_loss(None, None, None, None, None)
    # The references run in float64 on the same (float32-exact) inputs, so the gap is the model's float32 rounding:
    # a dot product of n unit-norm terms errs by at most n * eps32, times the logit scale (s, or 1/tau); cross-entropy
    # and KL move by at most twice the largest logit error. FR's teacher logits are dot products of 8 x d terms.
    eps32 = torch.finfo(torch.float32).eps
    bbc_tol = 2 * 7.0 * d * eps32 + 8 * eps32 * (1 + abs(out["bbc"].item()))
    fr_tol = 2 * (d + 8 * d) * eps32 / 0.1 + 8 * eps32 * (1 + abs(out["fr"].item()))
    q64, k64, ft64 = q.detach().double(), k.double(), ft.double()
    assert abs(out["bbc"].item() - _slow_bbc(q64, k64, 7.0)) <= bbc_tol
    assert abs(out["fr"].item() - _slow_fr(q64, k64, ft64, 0.1)) <= fr_tol
    assert abs(out["total"].item() - (out["bbc"].item() + 0.5 * out["fr"].item())) <= 2 * eps32 * abs(out["total"].item())
    # The teacher is a stop-gradient: the FR gradient flows through q and k only, never through F_t.
    ft.requires_grad_(True)
    model.compute_loss(None, None, None, None, None)["fr"].backward()
    assert ft.grad is None and q.grad is not None
    # The logit scale multiplies the logits: d L_BBC / d s is finite and nonzero.
    model.logit_scale.grad = None
    model.compute_loss(None, None, None, None, None)["bbc"].backward()
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad.abs()) > 0


def test_wo_bbc_and_wo_fr_totals(monkeypatch):
    for name, expect in (("wo_bbc", lambda o: 0.5 * o["fr"]), ("wo_fr", lambda o: o["bbc"])):
        model = build_model(ModelConfig().with_ablation(name))
        out = model.compute_loss(**_inputs(model))
        torch.testing.assert_close(out["total"], expect(out))


# ---------------------------------------------------------------- D4 gates
def test_release_gate_split_index_by_index():
    torch.manual_seed(1)
    d, k, b = 6, 8, 2  # K = 2P tokens with P = 4
    rev = FocusRevision(d, split="release")
    fr, fm = torch.randn(b, k, d), torch.randn(b, k, d)
    x = torch.cat([fr, fm], dim=-1).transpose(1, 2)
    g = torch.sigmoid(rev.mlp(x)).transpose(1, 2)  # B, K, 2D
    p = k // 2
    expected = torch.empty(b, k, d)
    for bi in range(b):
        for i in range(k):
            half = i % 2
            gv = g[bi, i // 2, half * d:(half + 1) * d]
            gt = g[bi, p + i // 2, half * d:(half + 1) * d]
            expected[bi, i] = gv * fr[bi, i] + gt * fm[bi, i]
    torch.testing.assert_close(rev(fr, fm), expected)

    rev.split = "per_token"
    plain = g[..., :d] * fr + g[..., d:] * fm
    torch.testing.assert_close(rev(fr, fm), plain)


def test_tfm_degenerate_depends_on_mask_only_through_fusion():
    torch.manual_seed(2)
    d = 16
    tfm = TextualFocusMapping(d, heads=4).double()
    t = torch.randn(3, d, dtype=torch.float64)
    g_m = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    s = tfm(t, g_m)
    # Reference formula of docs/model.md#tfm: the value part of each head only, a residual linear map.
    def v_part(conv):
        w = conv.weight[:, :, 0].view(4, 3, d // 4, d)[:, 2].reshape(d, d)
        return w

    u_t = t @ v_part(tfm.qkv_text).t() @ tfm.out_text.weight[:, :, 0].t() + tfm.out_text.bias + t
    u_m = g_m @ v_part(tfm.qkv_mask).t() @ tfm.out_mask.weight[:, :, 0].t() + tfm.out_mask.bias + g_m
    w_f = tfm.fusion.weight[:, :, 0]
    expected = torch.cat([u_t, u_m], dim=-1) @ w_f.t() + tfm.fusion.bias
    torch.testing.assert_close(s, expected, **F64_TOL)
    # Changing g_m changes s exactly by the fusion conv applied to the change in u_m (u_t is untouched).
    delta = torch.randn(3, d, dtype=torch.float64)
    s2 = tfm(t, g_m + delta)
    du_m = delta @ v_part(tfm.qkv_mask).t() @ tfm.out_mask.weight[:, :, 0].t() + delta
    torch.testing.assert_close(s2 - s, du_m @ w_f[:, d:].t(), **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tfm_degenerate_query_key_rows_get_exactly_zero_gradient(dtype):
    # The softmax over one key is 1: queries and keys do not enter the output, so their rows of both qkv maps get
    # an exactly zero gradient (not an attention kernel's rounding noise, which AdamW would turn into lr-sized
    # steps); the value rows get a real one.
    torch.manual_seed(2)
    d = 16
    tfm = TextualFocusMapping(d, heads=4).to(dtype)
    tfm(torch.randn(3, d, dtype=dtype), torch.randn(3, d, dtype=dtype)).square().sum().backward()
    for conv in (tfm.qkv_text, tfm.qkv_mask):
        grad = conv.weight.grad[:, :, 0].view(4, 3, d // 4, d)
        assert torch.all(grad[:, :2] == 0) and torch.all(grad[:, 2] != 0)


def _loss_gradients(model, inputs, dtype):
    model = model.to(dtype)
    model.zero_grad()
    x = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    model.compute_loss(**x)["total"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BACKBONES)
def test_parameters_with_zero_true_gradient_get_exactly_zero(name):
    # Elements whose float64 gradient is at float64's round-off level (|g| <= 1e-12 of the tensor's largest; the noise
    # is ~1e-16 of it, real gradients this small are rarer than 1 in 1e7 here) have a true gradient of zero (TFM's
    # query/key rows, every attention's key bias, unused token embeddings): their float32 gradient must be exactly
    # zero, or AdamW normalises the noise into lr-sized random steps that differ between machines and runs.
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=name))
    inputs = _inputs(model, b=4)
    inputs["texts"] = ["make it red", "same but striped and larger", "x", ""]
    # The float64 reference comes from a copy without the key-bias hooks (deepcopy drops tensor hooks), so what is
    # zero there is zero by the maths, not by the hook; a hook that zeroed too much would show below.
    bare = copy.deepcopy(model)
    assert all(p._backward_hooks is None for p in bare.parameters())
    g64 = _loss_gradients(copy.deepcopy(bare), inputs, torch.float64)
    g32_bare = _loss_gradients(bare, inputs, torch.float32)
    g32 = _loss_gradients(model, inputs, torch.float32)
    found = set()
    for n, g in g64.items():
        zero = g.abs() <= 1e-12 * g.abs().max()
        if zero.any():
            found.add(n.split(".")[0] if n.startswith("tfm.") else n.rsplit(".", 1)[-1])
            noisy = g32[n][zero] != 0
            assert not noisy.any(), (n, int(noisy.sum()), float(g32[n][zero].abs().max()))
        # everywhere else the hooks change nothing: the same float32 computation, bit for bit
        assert torch.equal(g32[n][~zero], g32_bare[n][~zero]), n
    assert {"tfm", "in_proj_bias"} <= found  # the check did meet the known invariances


# ----------------------------------------------------------- backbone contract
def test_batched_encoding_equals_separate_calls():
    # In float64 (F64_TOL): a layer that mixed samples would change rows by O(1), rounding by ~1e-15.
    model = build_model(ModelConfig(backbone="small")).eval().double()
    x = {k: (v.double() if torch.is_tensor(v) else v) for k, v in _inputs(model).items()}
    with torch.no_grad():
        both = model._encode_images([x["ref_images"], x["ref_masks"]])
        one = model.backbone.encode_image(x["ref_images"])
        two = model.backbone.encode_image(x["ref_masks"])
    for (tok_b, g_b), (tok_s, g_s) in zip(both, [one, two]):
        torch.testing.assert_close(tok_b, tok_s, **F64_TOL)
        torch.testing.assert_close(g_b, g_s, **F64_TOL)
    m2 = build_model(dataclasses.replace(model.config, batch_encoder_calls=False)).eval().double()
    m2.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2.encode_query(x["ref_images"], x["ref_masks"], x["texts"]),
                                   model.encode_query(x["ref_images"], x["ref_masks"], x["texts"]), **F64_TOL)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_global_features_match_openclip(name):
    model = build_model(ModelConfig(backbone=name)).eval().double()  # float64: F64_TOL, see above
    clip = model.backbone.clip
    s = model.preprocess.image_size
    images = torch.randn(4, 3, s, s, dtype=torch.float64)
    # Distinct samples: a layout mix-up (batch vs sequence axis) would swap rows between samples.
    tokens = model.tokenize(["a photo", "red striped dress with long sleeves", "x", ""])
    with torch.no_grad():
        patches, g = model.backbone.encode_image(images)
        e, t = model.backbone.encode_text(tokens)
        ref = clip.forward_intermediates(image=images, text=tokens, image_indices=1, text_indices=1,
                                         normalize=False, normalize_intermediates=True)
    torch.testing.assert_close(g, clip.encode_image(images)[0], **F64_TOL)  # (pooled, tokens)
    torch.testing.assert_close(t, clip.encode_text(tokens), **F64_TOL)
    grid = model.backbone.dims.grid
    assert patches.shape == (4, grid[0] * grid[1], model.backbone.dims.visual_width)
    nchw = ref["image_intermediates"][-1]
    torch.testing.assert_close(patches, nchw.flatten(2).transpose(1, 2), **F64_TOL)
    torch.testing.assert_close(e, ref["text_intermediates"][-1], **F64_TOL)
    # Per-sample independence: encoding one sample alone gives the same row.
    with torch.no_grad():
        _, g1 = model.backbone.encode_image(images[2:3])
    torch.testing.assert_close(g1[0], g[2], **F64_TOL)


def test_dims_read_from_openclip_vit():
    # A real OpenCLIP architecture (random init, no download): widths and grid come from the backbone.
    from offset_cir.model.backbone import Backbone

    bb = Backbone("ViT-B-32", None)
    assert (bb.dims.visual_width, bb.dims.embed_dim, bb.dims.text_width) == (768, 512, 512)
    assert bb.dims.grid == (7, 7) and bb.dims.context_length == 77 and bb.dims.image_size == 224


def test_parameter_groups_split_backbone_and_new_modules():
    model = build_model(ModelConfig())
    groups = model.parameter_groups(1e-5, 1e-4)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not (ids[0] & ids[1])
    assert id(model.backbone.visual_proj) in ids[0] and id(model.logit_scale) in ids[1]
    assert sum(len(s) for s in ids) == len([p for p in model.parameters() if p.requires_grad])
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="gate_split"):
        ModelConfig(gate_split="sideways")
    with pytest.raises(ValueError, match="even token count"):
        ModelConfig(focus_channels=3, focus_channels_local=4)
    ModelConfig(focus_channels=3, focus_channels_local=4, gate_split="per_token")
    with pytest.raises(ValueError, match="unknown ablation"):
        ModelConfig().with_ablation("wo_everything")
    with pytest.raises(ValueError, match=r"unknown config keys \['colour'\]; known: \['ablations', 'backbone'"):
        ModelConfig.from_dict({"backbone": "tiny", "colour": 3})


def test_config_reads_old_field_names_and_writes_new_ones(tmp_path):
    """A checkpoint whose config uses the switches' older names (without use_) loads into the same model; saving
    writes only the current names."""
    import json

    from offset_cir import load_checkpoint, save_checkpoint
    from offset_cir.model.config import LEGACY_FIELD_NAMES

    new_to_old = {new: old for old, new in LEGACY_FIELD_NAMES.items()}
    model = build_model(ModelConfig().with_ablation("wo_tfm", "wo_revision")).eval()  # two switches off
    folder = save_checkpoint(model, tmp_path / "ck")
    meta = json.loads((folder / "config.json").read_text())
    assert not set(LEGACY_FIELD_NAMES) & set(meta["model"]) and set(new_to_old) <= set(meta["model"])
    meta["model"] = {new_to_old.get(k, k): v for k, v in meta["model"].items()}  # the same config under the older names
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    old = load_checkpoint(folder).eval()
    assert old.config == model.config and old.tfm is None and old.revision is None
    x = _inputs(model, 2)
    with torch.no_grad():
        assert torch.equal(old.encode_query(x["ref_images"], x["ref_masks"], x["texts"]),
                           model.encode_query(x["ref_images"], x["ref_masks"], x["texts"]))
        assert torch.equal(old.encode_target(x["tgt_images"], x["tgt_masks"]),
                           model.encode_target(x["tgt_images"], x["tgt_masks"]))
    for old_name, new_name in LEGACY_FIELD_NAMES.items():  # each old name reaches its own new field
        cfg = ModelConfig.from_dict({old_name: False})
        assert getattr(cfg, new_name) is False
        assert all(v for k, v in cfg.to_dict().items() if k in new_to_old and k != new_name)
    with pytest.raises(ValueError, match="both 'tfm'"):
        ModelConfig.from_dict({"tfm": False, "use_tfm": True})


def test_masks_must_be_image_shaped():
    """None is the one "no mask" value: a zero-size (or otherwise mis-shaped) mask tensor is refused by name."""
    model = build_model(ModelConfig())
    x = _inputs(model, 2)
    for bad in (torch.zeros(2, 0), x["tgt_masks"][:, :, :8, :8]):
        with pytest.raises(ValueError, match=r"target masks have shape"):
            model.encode_target(x["tgt_images"], bad)
        with pytest.raises(ValueError, match=r"reference masks have shape"):
            model.compute_loss(x["ref_images"], bad, x["texts"], x["tgt_images"], x["tgt_masks"])


def test_run_config_yaml_with_old_field_names_loads(tmp_path):
    """A run folder's config.yaml (or a YAML preset of one's own) written with the older switch names trains the
    same model: the training config reads them through the same table; key=value overrides too."""
    from offset_cir.errors import UserInputError
    from offset_cir.train.config import TrainConfig, load_config

    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  backbone: tiny\n  tfm: false\n  target_focus_projection: false\n")
    cfg = load_config(str(path), ["model.fr_loss=false"])
    assert (cfg.model.use_tfm, cfg.model.use_target_focus_projection, cfg.model.use_fr_loss) == (False, False, False)
    assert cfg.model.use_revision and "tfm" not in cfg.to_dict()["model"]
    saved = cfg.to_dict()
    saved["model"] = {("revision" if k == "use_revision" else k): (False if k == "use_revision" else v)
                      for k, v in saved["model"].items()}
    assert TrainConfig.from_dict(saved).model.use_revision is False  # trainer_state.json / config.yaml on --resume
    with pytest.raises(UserInputError, match="both 'tfm'"):
        load_config(str(path), ["model.use_tfm=true"])
