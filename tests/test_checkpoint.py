"""Checkpoints, pretrained weights from local files, and the release converter (SPEC section 9)."""
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
from offset_cir.model.backbone import PACKAGE_BACKBONES, Backbone


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
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "missing")


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
    with pytest.raises(CheckpointError, match="shape mismatch"):
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
    """A state dict with the release's key names and shapes (SPEC section 9), random values."""
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
    """OFFSET's query and target features computed directly from the release tensors (SPEC section 3)."""
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
    clip.eval()
    s = model.preprocess.image_size
    img, mask, tgt, tmask = (torch.randn(2, 3, s, s) for _ in range(4))
    texts = ["make it red and striped", "smaller"]
    with torch.no_grad():
        q_ref, k_ref = _reference_forward(st, clip, img, mask, model.tokenize(texts), tgt, tmask)
        q = model.encode_query(img, mask, texts)
        k = model.encode_target(tgt, tmask)
    torch.testing.assert_close(q, q_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-5)


def test_convert_release_checkpoint_errors(tmp_path):
    st, _ = _release_state("tiny", p=4)
    st["backbone.unknown_block.weight"] = torch.zeros(1)
    torch.save(st, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown_block"):
        convert_release_checkpoint(tmp_path / "bad.pt", ModelConfig(backbone="tiny"))
    st, _ = _release_state("tiny", p=4)
    save_file({k: v.contiguous() for k, v in st.items()}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(CheckpointError, match="shape of visual_projection.score.2.weight"):
        convert_release_checkpoint(tmp_path / "ok.safetensors", ModelConfig(backbone="tiny", focus_channels=8))
    # DDP-prefixed keys are accepted
    torch.save({f"module.{k}": v for k, v in st.items()}, tmp_path / "ddp.pt")
    convert_release_checkpoint(tmp_path / "ddp.pt", ModelConfig(backbone="tiny"))
