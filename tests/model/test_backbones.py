"""The backbone contract (docs/model.md#backbone) over every OpenCLIP tower family.

Random init, offline. Each family is built from a copy of its OpenCLIP config, shrunk (fewer, narrower layers,
small images) so a test takes seconds; the timm trunk is shrunk by passing size arguments through
``timm.create_model`` (same class, same pooling head). Full-size builds are marked slow.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from offset_cir import ModelConfig, build_model
from offset_cir.model import backbone as bb
from offset_cir.model import towers
from offset_cir.model.backbone import Backbone

# float32 sums over a few hundred terms of O(1) values: differences of a few ulps times the width.
TOL = dict(rtol=1e-5, atol=1e-5)

VIT_SHRINK = dict(depth=1, embed_dim=64, num_heads=2, img_size=32)
TEXT_SHRINK = dict(width=32, heads=2, layers=1, context_length=16)

# family -> (OpenCLIP model, timm kwargs, image size, embed_dim, text overrides)
FAMILIES = {
    "siglip2": ("ViT-B-16-SigLIP2", VIT_SHRINK, 32, 64, dict(TEXT_SHRINK, vocab_size=1000)),  # map pool, no proj
    "eva02": ("EVA02-B-16", VIT_SHRINK, 32, 24, TEXT_SHRINK),  # class token, timm head as projection
    "pe": ("PE-Core-B-16", dict(VIT_SHRINK, attn_pool_num_heads=2), 32, 24, TEXT_SHRINK),  # rope, map pool
    "convnext": ("convnext_base", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), 64, 24, TEXT_SHRINK),
    "mobileclip2": ("MobileCLIP2-S0", {}, 64, 24, TEXT_SHRINK),  # FastViT, full width, small images
}
# an EVA02 trunk with two register tokens besides its class token (3 prefix tokens to drop)
PREFIX_CASES = {"eva02-reg": ("EVA02-B-16", dict(VIT_SHRINK, num_reg_tokens=2), 32, 24, TEXT_SHRINK)}


def _shrunk_config(model: str, image_size: int, embed_dim: int, text: dict) -> dict:
    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config(model))
    cfg["embed_dim"] = embed_dim
    cfg["vision_cfg"]["image_size"] = image_size
    cfg["text_cfg"].update(text)
    cfg["custom_text"] = cfg.get("custom_text", False)
    return cfg


def _patch_timm(monkeypatch, timm_kwargs: dict) -> None:
    import timm

    real = timm.create_model

    @functools.wraps(real)
    def create(name, *args, **kwargs):
        return real(name, *args, **{**kwargs, **timm_kwargs})

    monkeypatch.setattr(timm, "create_model", create)


def _register(monkeypatch, family: str) -> str:
    model, timm_kwargs, size, dim, text = {**FAMILIES, **PREFIX_CASES}[family]
    _patch_timm(monkeypatch, timm_kwargs)
    key = f"test-{family}"
    monkeypatch.setitem(towers.PACKAGE_BACKBONES, key, _shrunk_config(model, size, dim, text))
    return key


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT (random weights) saved as a local Hugging Face folder: config.json + model.safetensors."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    return folder


def _register_hf(monkeypatch, bert_dir, vision: str, pooler: str) -> str:
    if vision == "cnn":  # the packaged backbone's combination: a timm CNN + an HF text tower
        vision_cfg = {"timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg", "timm_proj": "linear",
                      "image_size": 64}
    else:
        vision_cfg = copy.deepcopy(towers.PACKAGE_BACKBONES["tiny"]["vision_cfg"])
    key = f"test-hf-{vision}-{pooler}"
    monkeypatch.setitem(towers.PACKAGE_BACKBONES, key, {
        "embed_dim": 24, "vision_cfg": vision_cfg,
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_proj_type": "linear", "hf_pooler_type": pooler,
                     "context_length": 12},
    })
    return key


def _tokens(backbone: Backbone, batch: int = 3) -> torch.Tensor:
    """Random ids of the tower's vocabulary with padding after a different length in each row."""
    length = backbone.dims.context_length
    vocab = getattr(backbone._text_module, "vocab_size", 100)
    ids = torch.randint(1, min(vocab, 1000), (batch, length))
    for row, used in enumerate([3, length // 2, length][:batch]):
        ids[row, used:] = backbone.pad_token_id
    return ids


def _check_contract(backbone: Backbone) -> None:
    dims = backbone.dims
    backbone.eval()
    s = dims.image_size
    images = torch.randn(3, 3, s, s)
    ids = _tokens(backbone)
    with torch.no_grad():
        tokens, g = backbone.encode_image(images)
        e, t = backbone.encode_text(ids)
        own_g = backbone.clip.encode_image(images, normalize=False)  # CoCa normalises by default
        own_t = backbone.clip.encode_text(ids, normalize=False)
        _, g_one = backbone.encode_image(images[1:2])
    h, w = dims.grid
    assert tokens.shape == (3, h * w, dims.visual_width)
    assert g.shape == (3, dims.embed_dim) and t.shape == (3, dims.embed_dim)
    assert e.shape == (3, dims.context_length, dims.text_width)
    # with output_tokens set (OpenCLIP ViTs, TextTransformer towers) OpenCLIP returns (pooled, tokens)
    own_g = own_g[0] if isinstance(own_g, tuple) else own_g
    own_t = own_t[0] if isinstance(own_t, tuple) else own_t
    torch.testing.assert_close(g, own_g, **TOL)
    torch.testing.assert_close(t, own_t, **TOL)
    torch.testing.assert_close(g_one[0], g[1], **TOL)  # no layer mixes samples


def _constant_map_head(backbone: Backbone, x: torch.Tensor, positions: int = 5) -> torch.Tensor:
    """The tower's own pooled head on a feature map whose every position holds x: for average, max, token and
    attention pooling alike this is the global feature of an image made of one repeated token."""
    visual = backbone.clip.visual
    trunk = visual.trunk
    if backbone.vision_kind == "timm-vit":
        seq = x[:, None].expand(-1, trunk.num_prefix_tokens + positions, -1)
        return visual.head(trunk.forward_head(seq))
    return visual.head(trunk.forward_head(x[:, :, None, None].expand(-1, -1, 2, 3)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_tower_contract(monkeypatch, family):
    backbone = Backbone(_register(monkeypatch, family))
    assert backbone.vision_kind == ("timm-cnn" if family in ("convnext", "mobileclip2") else "timm-vit")
    _check_contract(backbone)
    # W_proj is the tower's head applied to one token: equal to the head over a map of that token repeated.
    x = torch.randn(4, backbone.dims.visual_width)
    with torch.no_grad():
        torch.testing.assert_close(backbone.project_visual(x), _constant_map_head(backbone, x), **TOL)
        # tokens [B, N, C_v] map position by position
        torch.testing.assert_close(backbone.project_visual(x.view(2, 2, -1)).view(4, -1),
                                   backbone.project_visual(x), **TOL)


@pytest.mark.parametrize("family", ["siglip2", "eva02", "pe", "eva02-reg"])
def test_timm_vit_tokens_drop_prefix_tokens(monkeypatch, family):
    # Independent reference: timm's own forward_intermediates (final norm applied, prefix tokens removed, NCHW).
    backbone = Backbone(_register(monkeypatch, family)).eval()
    if family == "eva02-reg":
        assert backbone.clip.visual.trunk.num_prefix_tokens == 3
    s = backbone.dims.image_size
    images = torch.randn(2, 3, s, s)
    with torch.no_grad():
        tokens, _ = backbone.encode_image(images)
        ref = backbone.clip.visual.trunk.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(tokens, ref[-1].flatten(2).transpose(1, 2), **TOL)


@pytest.mark.parametrize("family", ["convnext", "mobileclip2"])
def test_cnn_tokens_are_the_pooled_feature_map(monkeypatch, family):
    # These towers average-pool their final map: W_proj of the mean of our tokens must give the tower's g.
    backbone = Backbone(_register(monkeypatch, family)).eval()
    s = backbone.dims.image_size
    with torch.no_grad():
        tokens, g = backbone.encode_image(torch.randn(2, 3, s, s))
        torch.testing.assert_close(backbone.project_visual(tokens.mean(dim=1)), g, **TOL)


@pytest.mark.parametrize("vision,pooler", [("cnn", "mean_pooler"), ("vit", "cls_pooler")])
def test_hf_text_tower_contract(monkeypatch, bert_dir, vision, pooler):
    backbone = Backbone(_register_hf(monkeypatch, bert_dir, vision, pooler))
    assert backbone.text_kind == "hf" and backbone.dims.text_width == 32 and backbone.dims.context_length == 12
    _check_contract(backbone)
    ids = _tokens(backbone)
    with torch.no_grad():
        e, t = backbone.encode_text(ids)
        hidden = backbone.clip.text.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    torch.testing.assert_close(e, hidden, **TOL)  # all L positions of the last hidden state, CLS included
    valid = backbone.text_attention_mask(ids)
    assert valid.tolist() == (ids != 0).tolist()  # D14's mask is the tower's attention mask (pad id 0 here)
    if pooler == "mean_pooler":  # t is the projected mean over the valid positions only
        mean = (e * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        torch.testing.assert_close(t, backbone.project_text(mean), **TOL)
    # a different pad id is read from the tower's config
    backbone.clip.text.config.pad_token_id = 7
    assert Backbone.text_attention_mask(backbone, torch.tensor([[5, 9, 7, 7]])).tolist() == [[True, True, False, False]]


def test_hf_text_tokenizer_from_local_folder(monkeypatch, bert_dir):
    # The tokenizer of a local HF folder is the folder's own (offline), not OpenCLIP's BPE.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "dress", "a"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(bert_dir)
    model = build_model(ModelConfig(backbone=_register_hf(monkeypatch, bert_dir, "vit", "mean_pooler")))
    ids = model.tokenize(["a red dress"])
    assert ids.shape == (1, 12) and ids[0, :3].tolist() == [6, 4, 5] and ids[0, 3:].eq(0).all()


@pytest.mark.parametrize("case", sorted(FAMILIES) + ["hf-cnn", "hf-vit", "coca", "pool-then-norm", "resnet"])
def test_training_step_reaches_every_parameter(monkeypatch, bert_dir, case):
    if case in FAMILIES:
        name = _register(monkeypatch, case)
    elif case.startswith("hf-"):
        name = _register_hf(monkeypatch, bert_dir, case[3:], "mean_pooler" if case == "hf-cnn" else "cls_pooler")
    else:
        name = _register_classic(monkeypatch, case)
    model = build_model(ModelConfig(backbone=name, text_padding="mask")).train()
    if case == "resnet":
        # OpenCLIP initialises each residual branch's last BN scale to zero (an identity block at init): the branch
        # gets exactly zero gradient until that scale moves. Give it the value any trained weights have.
        with torch.no_grad():
            for n, p in model.backbone.named_parameters():
                if n.endswith("bn3.weight"):
                    p.fill_(1.0)
    s = model.preprocess.image_size
    ids = _tokens(model.backbone, 2)
    images = [torch.randn(2, 3, s, s) for _ in range(4)]
    loss = model.compute_loss(images[0], images[1], ids, images[2], images[3])["total"]
    loss.backward()
    assert torch.isfinite(loss)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"trainable parameters without a gradient: {dead}"


def _register_classic(monkeypatch, case: str) -> str:
    """OpenCLIP's own ViT variants: CoCa-style attention pooling, CLIPA-style pool-then-norm."""
    cfg = copy.deepcopy(towers.PACKAGE_BACKBONES["tiny"])
    if case == "resnet":  # OpenCLIP's ModifiedResNet (RN50 ...), shrunk: attention pool over a 2x2 grid
        cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64}
    elif case == "coca":
        cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=8)
        cfg["text_cfg"].update(embed_cls=True)
        cfg["custom_text"] = True
    else:
        cfg["vision_cfg"].update(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True)
        cfg["text_cfg"].update(pool_type="last", no_causal_mask=True)
    monkeypatch.setitem(towers.PACKAGE_BACKBONES, f"test-{case}", cfg)
    return f"test-{case}"


def test_modified_resnet_contract(monkeypatch):
    backbone = Backbone(_register_classic(monkeypatch, "resnet"))
    assert backbone.vision_kind == "resnet" and backbone.dims.grid == (2, 2) and backbone.dims.visual_width == 256
    _check_contract(backbone)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # independent reference: OpenCLIP's own last intermediate (the layer4 map)
        tokens, _ = backbone.encode_image(images)
        ref = backbone.clip.visual.forward_intermediates(images, indices=1, intermediates_only=True)
    torch.testing.assert_close(tokens, ref["image_intermediates"][-1].flatten(2).transpose(1, 2), **TOL)


@pytest.mark.parametrize("case", ["coca", "pool-then-norm"])
def test_classic_vit_variants_contract(monkeypatch, case):
    backbone = Backbone(_register_classic(monkeypatch, case))
    _check_contract(backbone)
    visual = backbone.clip.visual
    x = torch.randn(4, backbone.dims.visual_width)
    # W_proj = the tower's pooled path on a sequence that repeats x (class token included)
    seq = x[:, None].expand(-1, 5, -1)
    with torch.no_grad():
        pooled, _ = visual._pool(seq)
        torch.testing.assert_close(backbone.project_visual(x), pooled @ visual.proj, **TOL)
        if case == "coca":  # tokens are the patches before the pooler, not the pooler's queries
            tokens, _ = backbone.encode_image(torch.randn(2, 3, 64, 64))
            assert tokens.shape[1] == backbone.dims.grid[0] * backbone.dims.grid[1]


# ------------------------------------------------------------------ pooling read from the text tower
def _custom_text_clip(pool_type: str, eos_id: int = 2):
    from open_clip.model import CustomTextCLIP

    cfg = copy.deepcopy(towers.PACKAGE_BACKBONES["tiny"])
    cfg["text_cfg"].update(pool_type=pool_type, eos_id=eos_id, no_causal_mask=True)
    return CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


@pytest.mark.parametrize("pool_type", ["last", "eos"])
def test_eot_positions_follow_the_text_towers_pooling(monkeypatch, pool_type):
    # A CustomTextCLIP has no CLIP-level text_pool_type: the rule is the text tower's own.
    monkeypatch.setattr(bb, "create_clip",
                        lambda name, pretrained, load_weights=True: _custom_text_clip(pool_type, eos_id=5))
    backbone = Backbone("tiny").eval()
    ids = torch.tensor([[49406, 7, 5, 0, 0, 0], [49406, 8, 9, 5, 3, 0]])  # the largest id is at 0, eos 5 elsewhere
    expected = [5, 5] if pool_type == "last" else [2, 3]
    assert backbone.eot_positions(ids).tolist() == expected
    with torch.no_grad():
        e, t = backbone.encode_text(ids)
        # the pooled position, by the tower's own rule, is the row t projects
        torch.testing.assert_close(t, backbone.project_text(e[torch.arange(2), torch.tensor(expected)]), **TOL)
    if pool_type == "eos":
        assert backbone.text_attention_mask(ids).tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2]


def test_siglip_normalisation_comes_from_the_towers_tags(monkeypatch):
    # Random init still preprocesses as the tower was trained: SigLIP's mean/std are 0.5, not OpenAI's.
    import open_clip

    key = _register(monkeypatch, "siglip2")
    shrunk = towers.PACKAGE_BACKBONES[key]
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: towers.build_clip_from_config(shrunk))
    model = build_model(ModelConfig(backbone="ViT-B-16-SigLIP2"))
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.std == (0.5, 0.5, 0.5)
    assert model.backbone.vision_kind == "timm-vit" and model.backbone.text_pool_type == "last"


# ------------------------------------------------------------------ listing
def test_available_backbones_lists_only_buildable_families(monkeypatch):
    import open_clip

    names = towers.available_backbones()
    for expected in ("tiny", "efficientnet-lite0-minilm", "ViT-B-16", "ViT-B-16-SigLIP2", "EVA02-B-16",
                     "convnext_base", "PE-Core-B-16", "MobileCLIP2-S0", "coca_ViT-B-32", "RN50"):
        assert expected in names
    assert all(bb.backbone_family(n) for n in names)
    assert "SigLIP" in bb.backbone_family("ViT-B-16-SigLIP2") and "EVA" in bb.backbone_family("EVA02-B-16")
    # what this version cannot build is not listed, decided from the config alone
    fake = {
        "fake-attnpool-cnn": {"embed_dim": 8, "vision_cfg": {"timm_model_name": "convnext_base", "timm_pool": "abs_attn"},
                              "text_cfg": {}},
        "fake-unknown-timm": {"embed_dim": 8, "vision_cfg": {"timm_model_name": "no_such_timm_model"}, "text_cfg": {}},
    }
    real_list, real_cfg = open_clip.list_models, open_clip.get_model_config
    monkeypatch.setattr(open_clip, "list_models", lambda: real_list() + sorted(fake))
    monkeypatch.setattr(open_clip, "get_model_config", lambda n: fake.get(n) or real_cfg(n))
    listed = towers.available_backbones()
    assert "fake-attnpool-cnn" not in listed and "fake-unknown-timm" not in listed and "RN50" in listed
    with pytest.raises(Exception, match="not supported"):
        towers.create_clip("fake-attnpool-cnn", None)


def test_info_prints_each_backbone_with_its_family(capsys):
    import argparse

    from offset_cir.commands import info

    assert info.run(argparse.Namespace(all_backbones=True, deviations=False)) == 0
    out = capsys.readouterr().out
    assert "EVA02-B-16" in out and "timm EVA" in out and "ModifiedResNet" in out


# ------------------------------------------------------------------ full size (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "EVA02-B-16", "convnext_base", "RN50", "coca_ViT-B-32"])
def test_full_size_towers_contract(name):
    backbone = Backbone(name)
    _check_contract(backbone)


@pytest.mark.parametrize("family", ["siglip2", "convnext"])
def test_bf16_autocast_step_on_timm_towers(monkeypatch, family):
    # W_proj on tokens mixes the tower's head with OFFSET's modules: dtypes must agree under autocast.
    model = build_model(ModelConfig(backbone=_register(monkeypatch, family), tfm_attention="tokens")).train()
    s = model.preprocess.image_size
    ids = _tokens(model.backbone, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss(*[torch.randn(2, 3, s, s) for _ in range(2)], ids,
                                  *[torch.randn(2, 3, s, s) for _ in range(2)])["total"]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["mobileclip2", "hf-cnn"])
def test_training_mode_encodes_each_sample_on_its_own(monkeypatch, bert_dir, family):
    # docs/model.md#backbone: image and mask go through the encoder in one call, on the premise that no layer mixes
    # samples. Batch norms in training mode would (batch statistics): the Backbone keeps their stored statistics.
    name = _register(monkeypatch, family) if family in FAMILIES else _register_hf(monkeypatch, bert_dir, "cnn", "mean_pooler")
    model = build_model(ModelConfig(backbone=name)).train()
    assert model.backbone.training and model.image_fc.training
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    s = model.preprocess.image_size
    images = torch.randn(4, 3, s, s) * torch.tensor([1.0, 3.0, 0.3, 2.0])[:, None, None, None]
    with torch.no_grad():
        tokens, g = model.backbone.encode_image(images)
        tokens_1, g_1 = model.backbone.encode_image(images[1:2])
    # batch 1 and batch 4 take different conv kernels: float32 rounding over ~1e3-term sums through a deep CNN,
    # ~1e-4 of the activations' scale (batch statistics would differ by O(1) of it)
    for one, many in ((g_1[0], g[1]), (tokens_1[0], tokens[1])):
        torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-4 * float(many.abs().max()))
