"""Contact sheet of a composed query: the reference, the modification text and the ranked results (PIL only)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from offset_cir.search.index import Hit
from offset_cir.search.inputs import load_pil


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _thumb(path_or_pil, cell: int):
    from PIL import Image

    try:
        im = load_pil(path_or_pil)
    except Exception:  # a gallery file that vanished: draw a grey tile instead of failing the whole sheet
        im = Image.new("RGB", (cell, cell), (200, 200, 200))
    scale = cell / max(im.width, im.height)  # small images are enlarged too, so every tile is filled
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    tile = Image.new("RGB", (cell, cell), (255, 255, 255))
    tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return tile


def contact_sheet(reference, text: str, hits: list[Hit], out: str | Path, *, cell: int = 160,
                  columns: int = 5) -> Path:
    """Draw reference + text (left) and the hits as a grid with rank, id and score; save to ``out`` (PNG/JPEG)."""
    from PIL import Image, ImageDraw

    pad, caption = 8, 34
    columns = max(1, min(columns, len(hits) or 1))
    rows = max(1, -(-len(hits) // columns))
    left = cell + 2 * pad
    width = left + columns * (cell + pad) + pad
    height = max(rows * (cell + caption + pad) + pad + 24, cell + 140)
    sheet = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    small, big = _font(12), _font(14)
    draw.text((pad, pad), "reference", fill=(0, 0, 0), font=big)
    sheet.paste(_thumb(reference, cell), (pad, pad + 20))
    y = pad + 24 + cell
    for line in textwrap.wrap(f'"{text}"', width=max(10, cell // 7))[:6]:
        draw.text((pad, y), line, fill=(20, 20, 120), font=small)
        y += 16
    draw.text((left, pad), f"top {len(hits)}", fill=(0, 0, 0), font=big)
    for n, h in enumerate(hits):
        r, c = divmod(n, columns)
        x = left + c * (cell + pad)
        yy = pad + 24 + r * (cell + caption + pad)
        sheet.paste(_thumb(h.path, cell), (x, yy))
        label = h.id if len(h.id) <= cell // 7 else "…" + h.id[-(cell // 7 - 1):]
        draw.text((x, yy + cell + 2), f"{n + 1}. {label}", fill=(0, 0, 0), font=small)
        draw.text((x, yy + cell + 17), f"score {h.score:.4f}", fill=(80, 80, 80), font=small)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
