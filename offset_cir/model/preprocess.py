"""Image and mask preprocessing (docs/model.md#preprocessing and #a1).

Training: RandomResizedCrop(image_size, scale 0.9-1.0, bicubic), as OpenCLIP's training transform; evaluation:
resize the shortest side, centre crop, normalise. A mask is rendered as a 3-channel image and goes through the
same preprocessing. In training the release crops image and mask independently; ``shared_crop=True`` (A1)
applies one random crop to both so they stay aligned.

The work of both transforms is bounded by their output, whatever the shape of the input: the evaluation transform
reads only the part of a thin image that survives its centre crop (:class:`ResizeCentreCrop`), and the training
crop keeps an aspect ratio of 3/4 to 4/3, so a strip gets a small crop before it is resized.
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
# Up to this aspect ratio (long side / short side) the evaluation transform resizes the whole image, as
# torchvision's Resize + CenterCrop do: the resized image is at most this many times the output.
WHOLE_RESIZE_MAX_ASPECT = 4.0
_BICUBIC_SUPPORT = 2.0  # PIL's bicubic filter reaches 2 source pixels each side (times the scale when reducing)


class ResizeCentreCrop:
    """Shortest side resized to ``size`` (bicubic), then the centre ``size`` x ``size`` crop: torchvision's
    ``Resize(size)`` followed by ``CenterCrop(size)`` on a PIL image, with work bounded by the output.

    Up to an aspect ratio of :data:`WHOLE_RESIZE_MAX_ASPECT` it runs exactly that pair (same pixels). A thinner image
    would first become ``size`` x ``size * aspect`` (a 1 x 100,000 strip: 224 x 22,400,000 pixels for a ViT), so
    beyond it only the source region that survives the crop is read: cut out with the filter's reach around it,
    resampled across (horizontal pass), then down (vertical pass), straight to ``size`` x ``size``. Same filter,
    same sample centres; the values differ from a whole-image resize only by PIL's float32 box coordinates and by
    the 8-bit rounding between the two passes (PIL may order the passes of a whole-image resize the other way):
    a few levels of 255 where the image has hard edges, at most 2 on smooth content
    (``tests/model/test_preprocess.py`` measures both).
    """

    def __init__(self, size: int):
        self.size = int(size)
        bicubic = InterpolationMode.BICUBIC
        self._whole = T.Compose([T.Resize(self.size, interpolation=bicubic), T.CenterCrop(self.size)])

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source region (left, top, right, bottom, in source pixels) that the resize-then-crop keeps."""
        s = self.size
        if width <= height:  # torchvision's output size of the resize, then CenterCrop's offsets
            new_w, new_h = s, int(s * height / width)
        else:
            new_w, new_h = int(s * width / height), s
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        sx, sy = width / new_w, height / new_h
        return left * sx, top * sy, (left + s) * sx, (top + s) * sy

    def _reach(self, start: float, end: float, limit: int) -> tuple[int, int]:
        """Source pixels [lo, hi) that a bicubic resample of [start, end) to ``size`` samples reads."""
        margin = _BICUBIC_SUPPORT * max((end - start) / self.size, 1.0) + 1.0
        return max(0, math.floor(start - margin)), min(limit, math.ceil(end + margin))

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if max(w, h) <= WHOLE_RESIZE_MAX_ASPECT * min(w, h):
            return self._whole(img)
        s = self.size
        x0, y0, x1, y1 = self.crop_box(w, h)
        (c0, c1), (r0, r1) = self._reach(x0, x1, w), self._reach(y0, y1, h)
        region = img.crop((c0, r0, c1, r1))
        rows = r1 - r0
        # one axis per call, horizontal first, so PIL's order of passes is ours
        across = region.resize((s, rows), Image.BICUBIC, box=(x0 - c0, 0, x1 - c0, rows))
        return across.resize((s, s), Image.BICUBIC, box=(0, y0 - r0, s, y1 - r0))

    def __repr__(self) -> str:
        return f"ResizeCentreCrop(size={self.size}, bicubic)"


class Preprocess:
    """Train and eval transforms for images and masks; picklable (used inside DataLoader workers)."""

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, shared_crop: bool = False):
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.shared_crop = shared_crop
        bicubic = InterpolationMode.BICUBIC
        self._finish = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        self.train_transform = T.RandomResizedCrop(self.image_size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, interpolation=bicubic)
        self.eval_transform = ResizeCentreCrop(self.image_size)

    @staticmethod
    def _rgb(img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def image(self, img: Image.Image, train: bool = False) -> torch.Tensor:
        """An RGB PIL image -> normalised tensor [3, S, S]."""
        img = self._rgb(img)
        return self._finish(self.train_transform(img) if train else self.eval_transform(img))

    def mask(self, mask: Image.Image, train: bool = False) -> torch.Tensor:
        """A grayscale mask -> rendered as RGB, normalised like an image [3, S, S]."""
        return self.image(mask, train)

    def pair(self, img: Image.Image, mask: Image.Image | None, train: bool = False):
        """(image tensor, mask tensor or None); one shared crop in training when ``shared_crop`` (A1)."""
        if mask is None:
            return self.image(img, train), None
        if not (train and self.shared_crop):
            return self.image(img, train), self.mask(mask, train)
        img, mask = self._rgb(img), self._rgb(mask)
        if mask.size != img.size:
            mask = mask.resize(img.size, Image.BILINEAR)
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(TRAIN_SCALE), list(TRAIN_RATIO))
        size = [self.image_size, self.image_size]
        crop_img = TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC)
        crop_mask = TF.resized_crop(mask, top, left, h, w, size, InterpolationMode.BICUBIC)
        return self._finish(crop_img), self._finish(crop_mask)

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, shared_crop={self.shared_crop})"
