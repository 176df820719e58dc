"""Tiny randomly initialised captioner and segmenter folders, for tests and benchmarks (no hub, no weights).

``build_tiny_blip(folder)`` and ``build_tiny_clipseg(folder)`` write a model plus its processor with
``save_pretrained`` so they load back through the same by-folder path a user's downloaded model takes
(``--captioner DIR`` / ``--segmenter DIR``).  Their outputs are meaningless; sizes and formats are real.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# A small WordPiece vocabulary for the tiny BLIP text decoder (BERT layout: special tokens first).
_BLIP_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_BLIP_WORDS = (
    "a an the of with and in on dress shirt top tee shoe shoes red blue green black white long short sleeve "
    "sleeves striped floral woman man photo picture image person wearing pair boots heels sandals"
).split()


def _blip_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return _BLIP_SPECIAL + _BLIP_WORDS + letters + ["##" + c for c in letters] + list(".,!?")


def build_tiny_blip(folder: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random ``BlipForConditionalGeneration`` + ``BlipProcessor`` into ``folder``; return it."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _blip_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer.from_pretrained(tmp, bos_token="[DEC]")
    ids = {tok: i for i, tok in enumerate(vocab)}
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
            bos_token_id=ids["[DEC]"], pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"],
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    # BLIP's vision init is near zero (initializer_range 1e-10); spread it so captions depend on the image.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and (name.startswith("vision_model") or "crossattention" in name):
                p.normal_(0.0, 0.3)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return out


def build_tiny_clipseg(folder: str | os.PathLike, image_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor`` into ``folder``; return it.

    The tokenizer is the real CLIP vocabulary made offline from OpenCLIP's BPE file
    (:mod:`offset_cir.masks.tokenizer`); ``image_size`` plays the role of CLIPSeg's 352.
    """
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from offset_cir.masks.tokenizer import build_clip_tokenizer

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    config = CLIPSegConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=32, extract_layers=(0, 1), reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, resample=2, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return out


def build_tiny_blip2(folder: str | os.PathLike, image_size: int = 32, num_query_tokens: int = 4, seed: int = 0) -> Path:
    """Save a tiny random ``Blip2ForConditionalGeneration`` (tiny OPT decoder) + ``Blip2Processor``; return it.

    The OPT tokenizer is a byte-level BPE over the 256 byte symbols (no merges needed), the same family as the
    released ``Salesforce/blip2-opt-2.7b`` tokenizer.
    """
    import json

    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, GPT2Tokenizer

    from offset_cir.masks.tokenizer import byte_symbols

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(byte_symbols().values()))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = GPT2Tokenizer.from_pretrained(tmp, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                                  unk_token="<unk>")
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=len(tokenizer)),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=128,
                         bos_token_id=vocab["</s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"]),
        num_query_tokens=num_query_tokens, image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor.save_pretrained(out)
    model.save_pretrained(out)
    return out
