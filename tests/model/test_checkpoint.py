"""Checkpoints, pretrained weights from local files, and the release converter (docs/model.md#release-checkpoints)."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from safetensors.torch import save_file

from offset_cir import ModelConfig, build_model, convert_release_checkpoint, load_checkpoint, save_checkpoint
from offset_cir.errors import CheckpointError, OfflineError
from offset_cir.model.backbone import Backbone
from offset_cir.model.towers import PACKAGE_BACKBONES


def _batch(model, b=3):
    s = model.preprocess.image_size
    return torch.randn(b, 3, s, s), torch.randn(b, 3, s, s), ["turn it blue", "with stripes", "smaller"][:b]


def test_round_trip_is_bit_exact(tmp_path):
    model = build_model(ModelConfig(backbone="tiny", gate_split="per_token"))
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(folder)
    assert loaded.config == model.config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    img, mask, text = _batch(model)
    with torch.no_grad():
        assert torch.equal(model.eval().encode_query(img, mask, text), loaded.eval().encode_query(img, mask, text))


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    save_checkpoint(build_model(ModelConfig(backbone="tiny")), tmp_path / "a")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "a", config=ModelConfig(backbone="small"))
    msg = str(err.value)
    assert "does not match" in msg and "backbone: checkpoint 'tiny', requested 'small'" in msg
    assert "shape of backbone.clip" in msg and "shapes differ for" in msg
    # an ablated checkpoint loaded into a full model misses the revision module's keys
    save_checkpoint(build_model(ModelConfig().with_ablation("wo_revision")), tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(4\): revision\.mlp"):
        load_checkpoint(tmp_path / "b", config=ModelConfig())
    with pytest.raises(CheckpointError, match="missing does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoint_config_corrupt(tmp_path):
    save_checkpoint(build_model(ModelConfig()), tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "c")


def test_pretrained_local_file(tmp_path):
    cfg = PACKAGE_BACKBONES["tiny"]
    clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    weights = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    bb = Backbone("tiny", str(weights))
    for k, v in clip.state_dict().items():
        assert torch.equal(bb.clip.state_dict()[k], v)
    # a torch state dict file goes through weights_only=True
    pt = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), pt)
    assert torch.equal(Backbone("tiny", str(pt)).clip.visual.proj, clip.visual.proj)
    # weights of another architecture are refused with the differing keys named
    other = PACKAGE_BACKBONES["small"]
    save_file({k: v.contiguous() for k, v in CLIP(other["embed_dim"], other["vision_cfg"], other["text_cfg"]).state_dict().items()},
              str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match="weights do not fit this backbone(?s:.*)shapes differ for"):
        Backbone("tiny", str(tmp_path / "small.safetensors"))


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="weights_only"):
        Backbone("tiny", str(path))


def test_pretrained_tag_offline_fails_fast(monkeypatch):
    # Fails at once: no network connection attempted, no retry loop sleeping between attempts.
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(("connect", a)) or (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(OfflineError, match="local file"):
        Backbone("ViT-B-32", "laion2b_s34b_b79k")
    assert calls == []
    with pytest.raises(Exception, match="neither a local file nor an OpenCLIP tag"):
        Backbone("ViT-B-32", "no_such_tag")


# ------------------------------------------------------------ release converter
def _release_state(backbone="tiny", p=4):
    """A state dict with the release's key names and shapes (docs/model.md#release-checkpoints), random values."""
    cfg = PACKAGE_BACKBONES[backbone]
    clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    cv, d, ct = cfg["vision_cfg"]["width"], cfg["embed_dim"], cfg["text_cfg"]["width"]
    r = lambda *s: torch.randn(*s) * 0.2  # noqa: E731
    st = {f"backbone.clip.{k}": v for k, v in clip.state_dict().items()}
    st.update({
        "loss_T": torch.tensor([9.0]), "local_weight": torch.ones(2 * p),
        "backbone.fc.weight": r(d, cv), "backbone.fc.bias": r(d),
        "backbone.text_fc.weight": r(d, ct), "backbone.text_fc.bias": r(d),
        "backbone.chanel_score.0.weight": r(d // 2, d, 1), "backbone.chanel_score.2.weight": r(p, d // 2, 1),
        "backbone.chanel_score_text.0.weight": r(d // 2, d, 1), "backbone.chanel_score_text.2.weight": r(p, d // 2, 1),
        "backbone.seg_fusion.fusion_proj.weight": r(cv, 2 * cv, 1, 1), "backbone.seg_fusion.fusion_proj.bias": r(cv),
        "backbone.segText_fusion.weight": r(d, 2 * d, 1), "backbone.segText_fusion.bias": r(d),
        "affine.MLP.0.weight": r(d, 2 * d, 1), "affine.MLP.0.bias": r(d),
        "affine.MLP.2.weight": r(2 * d, d, 1), "affine.MLP.2.bias": r(2 * d),
        # dead code of the release: present in files, ignored
        "backbone.attention_spatial.qkv.weight": r(3, 3), "affine.cross_attention_text.qkv_A.weight": r(3, 3),
        "backbone.cross_attention_text.norm_A.weight": r(d), "backbone.cross_attention_text.norm_B.weight": r(d),
    })
    for s in "AB":
        st[f"backbone.cross_attention.norm_{s}.weight"] = 1 + r(cv)
        st[f"backbone.cross_attention.norm_{s}.bias"] = r(cv)
        st[f"backbone.cross_attention.qkv_{s}.weight"] = r(3 * cv, cv, 1, 1)
        st[f"backbone.cross_attention.out_{s}.weight"] = r(cv, cv, 1, 1)
        st[f"backbone.cross_attention.out_{s}.bias"] = r(cv)
        st[f"backbone.cross_attention_text.qkv_{s}.weight"] = r(3 * d, d, 1)
        st[f"backbone.cross_attention_text.out_{s}.weight"] = r(d, d, 1)
        st[f"backbone.cross_attention_text.out_{s}.bias"] = r(d)
    return st, clip


def _heads(w4, x_map, heads):
    """Release qkv on a map: per-head [q|k|v] blocks; returns lists of [B, hw, dh] per head."""
    qkv = F.conv2d(x_map, w4)  # B, 3C, h, w
    b, c3 = qkv.shape[:2]
    dh = c3 // 3 // heads
    qkv = qkv.flatten(2)
    out = []
    for h in range(heads):
        chunk = qkv[:, h * 3 * dh:(h + 1) * 3 * dh]
        out.append([chunk[:, i * dh:(i + 1) * dh].transpose(1, 2) for i in range(3)])
    return out


def _reference_forward(st, clip, images, masks, tokens, tgt_images, tgt_masks, heads=4):
    """OFFSET's query and target features computed directly from the release tensors (docs/model.md#modules)."""
    g = lambda k: st[k]  # noqa: E731
    cv = g("backbone.fc.weight").shape[1]

    def encode(x):
        out = clip.forward_intermediates(image=x, image_indices=1, normalize=False, normalize_intermediates=True)
        return out["image_intermediates"][-1], out["image_features"]  # B,C,h,w (after ln_post), B,D

    def vfm(a_map, s_map):
        a = F.group_norm(a_map, 16, g("backbone.cross_attention.norm_A.weight"), g("backbone.cross_attention.norm_A.bias"))
        s = F.group_norm(s_map, 16, g("backbone.cross_attention.norm_B.weight"), g("backbone.cross_attention.norm_B.bias"))
        ha = _heads(g("backbone.cross_attention.qkv_A.weight"), a, heads)
        hs = _heads(g("backbone.cross_attention.qkv_B.weight"), s, heads)
        img_heads, mask_heads = [], []
        for (qa, ka, va), (qs, ks, vs) in zip(ha, hs):
            img_heads.append(torch.softmax(qs @ ka.transpose(1, 2) / math.sqrt(cv), -1) @ va)
            mask_heads.append(torch.softmax(qa @ ks.transpose(1, 2) / math.sqrt(cv), -1) @ vs)
        b, c, h, w = a.shape
        to_map = lambda hs_: torch.cat(hs_, -1).transpose(1, 2).reshape(b, c, h, w)  # noqa: E731
        oa = F.conv2d(to_map(img_heads), g("backbone.cross_attention.out_A.weight"), g("backbone.cross_attention.out_A.bias")) + a
        os_ = F.conv2d(to_map(mask_heads), g("backbone.cross_attention.out_B.weight"), g("backbone.cross_attention.out_B.bias")) + s
        fused = F.conv2d(torch.cat([oa, os_], 1), g("backbone.seg_fusion.fusion_proj.weight"), g("backbone.seg_fusion.fusion_proj.bias"))
        return fused.flatten(2).transpose(1, 2)

    def mgfp(x, prefix):
        w = torch.tanh(F.conv1d(x.transpose(1, 2), g(prefix + "0.weight")))
        w = torch.softmax(F.conv1d(w, g(prefix + "2.weight")), dim=-1)
        return w @ x

    def visual(x, m):
        (zmap, gx), (smap, gm) = encode(x), encode(m)
        f = vfm(zmap, smap)
        gset = torch.stack([f[:, 0] @ clip.visual.proj + gx, gx, gm], 1)
        lset = F.linear(f, g("backbone.fc.weight"), g("backbone.fc.bias"))
        return torch.cat([mgfp(gset, "backbone.chanel_score."), mgfp(lset, "backbone.chanel_score.")], 1), gm

    fr, gm = visual(images, masks)
    t = clip.encode_text(tokens)
    e = clip.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True)["text_intermediates"][-1]
    d = t.shape[1]
    dh = d // heads

    def v_only(w3, x):  # value rows of the per-head layout
        rows = torch.cat([torch.arange(h * 3 * dh + 2 * dh, h * 3 * dh + 3 * dh) for h in range(heads)])
        return x @ w3[rows, :, 0].t()

    ut = F.linear(v_only(g("backbone.cross_attention_text.qkv_A.weight"), t), g("backbone.cross_attention_text.out_A.weight")[:, :, 0], g("backbone.cross_attention_text.out_A.bias")) + t
    um = F.linear(v_only(g("backbone.cross_attention_text.qkv_B.weight"), gm), g("backbone.cross_attention_text.out_B.weight")[:, :, 0], g("backbone.cross_attention_text.out_B.bias")) + gm
    s = F.linear(torch.cat([ut, um], -1), g("backbone.segText_fusion.weight")[:, :, 0], g("backbone.segText_fusion.bias"))
    tset = torch.stack([s + t, t, gm], 1)
    tloc = F.linear(e, g("backbone.text_fc.weight"), g("backbone.text_fc.bias"))
    fm = torch.cat([mgfp(tset, "backbone.chanel_score_text."), mgfp(tloc, "backbone.chanel_score_text.")], 1)
    x = torch.cat([fr, fm], -1).transpose(1, 2)
    hid = F.leaky_relu(F.conv1d(x, g("affine.MLP.0.weight"), g("affine.MLP.0.bias")))
    gates = torch.sigmoid(F.conv1d(hid, g("affine.MLP.2.weight"), g("affine.MLP.2.bias"))).transpose(1, 2)  # B,K,2D
    k = fr.shape[1]
    comp = torch.empty_like(fr)
    for i in range(k):  # D4, the release's token-wise split
        half = slice((i % 2) * d, (i % 2 + 1) * d)
        comp[:, i] = gates[:, i // 2, half] * fr[:, i] + gates[:, k // 2 + i // 2, half] * fm[:, i]
    q = F.normalize(comp.mean(1), dim=-1)
    ft, _ = visual(tgt_images, tgt_masks)
    return q, F.normalize(ft.mean(1), dim=-1)


def test_convert_release_checkpoint_reproduces_reference_forward(tmp_path):
    st, clip = _release_state("tiny", p=4)
    path = tmp_path / "release_state.pt"
    torch.save(st, path)
    model = convert_release_checkpoint(path, ModelConfig(backbone="tiny", focus_channels=4)).eval()
    assert float(model.logit_scale.detach()) == 9.0
    clip.load_state_dict({k[len("backbone.clip."):]: v for k, v in st.items() if k.startswith("backbone.clip.")})
    # Both sides run in float64: a key, layout or formula error moves the unit-norm features by O(1e-2) or more,
    # float64 rounding through these few layers (width <= 64, O(1) values) by < 1e3 * eps64 ~ 2e-13, whatever the
    # machine's kernels. (In float32 the gap would be kernel-dependent, ~1e-6.)
    model.double()
    clip.double().eval()
    st = {k: (v.double() if v.is_floating_point() else v) for k, v in st.items()}
    s = model.preprocess.image_size
    img, mask, tgt, tmask = (torch.randn(2, 3, s, s, dtype=torch.float64) for _ in range(4))
    texts = ["make it red and striped", "smaller"]
    with torch.no_grad():
        q_ref, k_ref = _reference_forward(st, clip, img, mask, model.tokenize(texts), tgt, tmask)
        q = model.encode_query(img, mask, texts)
        k = model.encode_target(tgt, tmask)
    torch.testing.assert_close(q, q_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k, k_ref, rtol=1e-10, atol=1e-10)


def test_convert_release_checkpoint_errors(tmp_path):
    st, _ = _release_state("tiny", p=4)
    st["backbone.unknown_block.weight"] = torch.zeros(1)
    torch.save(st, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown_block"):
        convert_release_checkpoint(tmp_path / "bad.pt", ModelConfig(backbone="tiny"))
    st, _ = _release_state("tiny", p=4)
    save_file({k: v.contiguous() for k, v in st.items()}, str(tmp_path / "ok.safetensors"))
    # a config whose P disagrees with the weights: both values named, not a shape error
    with pytest.raises(CheckpointError) as err:
        convert_release_checkpoint(tmp_path / "ok.safetensors", ModelConfig(backbone="tiny", focus_channels=8))
    msg = str(err.value)
    assert "P=4" in msg and "focus_channels=8" in msg and "backbone.chanel_score.2.weight" in msg
    assert "shape" not in msg
    # DDP-prefixed keys are accepted
    torch.save({f"module.{k}": v for k, v in st.items()}, tmp_path / "ddp.pt")
    convert_release_checkpoint(tmp_path / "ddp.pt", ModelConfig(backbone="tiny"))


def test_convert_release_checkpoint_reads_p_from_the_weights(tmp_path):
    # P left unset (None): the release's visual MG-FP output conv has P rows; the model is built with that P.
    st, _ = _release_state("tiny", p=6)
    torch.save(st, tmp_path / "p6.pt")
    model = convert_release_checkpoint(tmp_path / "p6.pt", ModelConfig(backbone="tiny", focus_channels=None))
    assert model.config.focus_channels == 6 and model.config.focus_channels_local is None
    assert torch.equal(model.state_dict()["visual_projection.score.2.weight"], st["backbone.chanel_score.2.weight"])
    assert torch.equal(model.state_dict()["text_projection.score.2.weight"], st["backbone.chanel_score_text.2.weight"])
    with pytest.raises(CheckpointError, match="P=6.*focus_channels=4"):
        convert_release_checkpoint(tmp_path / "p6.pt", ModelConfig(backbone="tiny"))
    # the visual and text MG-FP must agree
    st["backbone.chanel_score_text.2.weight"] = torch.zeros(4, st["backbone.chanel_score_text.2.weight"].shape[1], 1)
    torch.save(st, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="disagree on P"):
        convert_release_checkpoint(tmp_path / "mixed.pt", ModelConfig(backbone="tiny", focus_channels=None))
    # outside the converter an unset P is refused with a message, not a TypeError
    with pytest.raises(ValueError, match="focus_channels is unset"):
        build_model(ModelConfig(backbone="tiny", focus_channels=None))


# ------------------------------------------------------------ bad checkpoints and where they come from
def _saved(tmp_path, name="ck"):
    return save_checkpoint(build_model(ModelConfig(backbone="tiny")), tmp_path / name)


@pytest.mark.parametrize("field, value, expected", [
    ("vfm_heads", "four", "an integer"),
    ("vfm_heads", 4.0, "an integer"),
    ("use_masks", "yes", "true/false"),
    ("focus_channels_local", "4", "an integer or null"),
    ("mu", "0.5", "a number"),
    ("backbone", 7, "a string"),
    ("ablations", ["wo_fm", 3], "a list of strings"),
    ("gate_split", "sideways", "one of 'release', 'per_token'"),
])
def test_wrong_typed_config_field_names_field_type_and_file(tmp_path, field, value, expected):
    import json

    folder = _saved(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"][field] = value
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert f"model.{field}" in msg and expected in msg and str(folder / "config.json") in msg


def test_config_types_accept_every_default_and_ints_for_floats(tmp_path):
    import json

    folder = _saved(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(mu=1, focus_channels_local=None)  # a hand-written 1 for 1.0 is the same number
    (folder / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(folder).config.mu == 1


def test_run_folder_suggests_best_and_last(tmp_path):
    run = tmp_path / "run"
    _saved(run, "best")
    _saved(run, "last")
    (run / "config.yaml").write_text("name: run\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run)
    msg = str(err.value)
    assert f"{run / 'best'} (best validation score)" in msg and f"{run / 'last'} (latest step)" in msg
    assert "training run folder" in msg
    with pytest.raises(CheckpointError, match=r"checkpoint .*nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def _hub_snapshot(cache, folder, repo="my-org/offset-tiny", commit="0123456789abcdef0123456789abcdef01234567"):
    """A local snapshot laid out as huggingface_hub's cache expects: refs/main + snapshots/<commit>/files."""
    import shutil

    store = cache / f"models--{repo.replace('/', '--')}"
    (store / "refs").mkdir(parents=True)
    (store / "refs" / "main").write_text(commit)
    snap = store / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snap / name)
    return snap


def test_hf_hub_checkpoint_from_the_cache_offline(tmp_path, monkeypatch):
    import socket

    from offset_cir.model.checkpoint import checkpoint_hash

    model = build_model(ModelConfig(backbone="tiny", gate_split="per_token"))
    folder = save_checkpoint(model, tmp_path / "ck")
    _hub_snapshot(tmp_path / "hub", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network call when cached"))
    loaded = load_checkpoint("hf-hub:my-org/offset-tiny")
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert checkpoint_hash("hf-hub:my-org/offset-tiny") == checkpoint_hash(folder)


def test_hf_hub_checkpoint_offline_not_cached_fails_fast(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append("connect") or (_ for _ in ()).throw(OSError()))
    with pytest.raises(OfflineError) as err:
        load_checkpoint("hf-hub:my-org/not-cached")
    assert "not in the Hugging Face cache" in str(err.value) and str(tmp_path / "empty") in str(err.value)
    assert calls == []
    with pytest.raises(CheckpointError, match="expected hf-hub:ORG/NAME"):
        load_checkpoint("hf-hub:no-slash")


def test_null_focus_channels_in_a_saved_config_is_a_checkpoint_error(tmp_path):
    """focus_channels=None means "read P from the weights" for the release converter only; a saved checkpoint
    with it is refused by name (not a ValueError traceback from building the model)."""
    import json

    folder = _saved(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["focus_channels"] = None
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="focus_channels") as err:
        load_checkpoint(folder)
    assert str(folder / "config.json") in str(err.value)


# ------------------------------------------------------------ load_weights=False
def test_load_weights_false_builds_the_architecture_and_keeps_pretrained(tmp_path):
    # a weights file that is not there: with load_weights=False nothing is read, and the config keeps its name
    absent = str(tmp_path / "absent.safetensors")
    model = build_model(ModelConfig(backbone="tiny", pretrained=absent), load_weights=False)
    assert model.config.pretrained == absent
    with pytest.raises(Exception, match="must be a local weights file"):  # with the weights, the file is needed
        build_model(ModelConfig(backbone="tiny", pretrained=absent))


def _tiny_clip_as(monkeypatch, name: str):
    """OpenCLIP's ``name`` built as the tiny package config (same code path, seconds instead of minutes)."""
    import open_clip

    from offset_cir.model import backbone as bb
    from offset_cir.model import towers

    monkeypatch.setattr(open_clip, "create_model",
                        lambda *a, **k: towers.build_clip_from_config(PACKAGE_BACKBONES["tiny"]))
    for module in (bb, towers):  # the wrapper and the builder each read the family
        monkeypatch.setattr(module, "backbone_family", lambda n: "test family")


def test_a_converted_release_keeps_the_pretrained_it_was_given(tmp_path):
    """The release file holds every weight: the backbone's pretrained weights are not read, but the model's config
    still says which they were (it is saved with the converted checkpoint)."""
    st, _ = _release_state("tiny", p=4)
    torch.save(st, tmp_path / "release.pt")
    absent = str(tmp_path / "backbone-weights-not-here.safetensors")
    model = convert_release_checkpoint(tmp_path / "release.pt", ModelConfig(backbone="tiny", pretrained=absent))
    assert model.config.pretrained == absent and model.config.focus_channels == 4
    assert torch.equal(model.backbone.clip.visual.proj, st["backbone.clip.visual.proj"])
    assert load_checkpoint(save_checkpoint(model, tmp_path / "ck")).config == model.config


def test_a_checkpoint_of_a_tagged_backbone_loads_with_that_tags_normalisation(tmp_path, monkeypatch):
    """ViT-L-14's tags normalise differently (OpenAI's vs LAION's mean/std): a checkpoint trained from one tag
    must preprocess as that tag did, not as the untagged default."""
    import dataclasses

    import open_clip

    from offset_cir.model.preprocess import OPENAI_MEAN

    name, tag = "ViT-L-14", "laion2b_s32b_b82k"
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    assert tuple(tag_cfg["mean"]) != tuple(OPENAI_MEAN)  # else this test would prove nothing
    _tiny_clip_as(monkeypatch, name)
    trained = build_model(ModelConfig(backbone=name))
    trained.config = dataclasses.replace(trained.config, pretrained=tag)  # as if trained from the tag
    loaded = load_checkpoint(save_checkpoint(trained, tmp_path / "ck"))
    assert loaded.config.pretrained == tag
    assert loaded.preprocess.mean == tuple(tag_cfg["mean"]) and loaded.preprocess.std == tuple(tag_cfg["std"])
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))


def test_hub_probe_asks_the_configured_endpoint(tmp_path, monkeypatch):
    """One probe for the hub everywhere: HF_ENDPOINT (a mirror) is the address tried, not huggingface.co."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    tried = []
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: tried.append(address) or (_ for _ in ()).throw(OSError("refused")))
    with pytest.raises(OfflineError, match="not in the Hugging Face cache"):
        load_checkpoint("hf-hub:my-org/not-cached")
    assert tried == [("127.0.0.1", 9)]
    # switched off the way huggingface_hub reads the switch: no connection at all
    for value in ("1", "ON", "yes", "True"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(OfflineError):
            load_checkpoint("hf-hub:my-org/not-cached")
    assert tried == [("127.0.0.1", 9)]


# ------------------------------------------------------------ writes through offset_cir.io
def _count_fsyncs(monkeypatch) -> list:
    import os

    calls, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    return calls


def test_save_checkpoint_is_flushed_to_disk_and_a_failed_save_leaves_the_old_one(tmp_path, monkeypatch):
    import os

    model = build_model(ModelConfig(backbone="tiny"))
    fsyncs = _count_fsyncs(monkeypatch)
    folder = save_checkpoint(model, tmp_path / "ck")
    assert len(fsyncs) == 2  # weights and config, each on disk before it is renamed into place
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = build_model(ModelConfig(backbone="tiny"))

    def refuse(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary left, nothing replaced
