"""Image and mask preprocessing (SPEC section 5 and section 4, A1).

Training: RandomResizedCrop(image_size, scale 0.9-1.0, bicubic), as OpenCLIP's training transform; evaluation:
resize the shortest side, centre crop, normalise. A mask is rendered as a 3-channel image and goes through the
same preprocessing. In training the release crops image and mask independently; ``shared_crop=True`` (A1)
applies one random crop to both so they stay aligned.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


class Preprocess:
    """Train and eval transforms for images and masks; picklable (used inside DataLoader workers)."""

    def __init__(self, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, shared_crop: bool = False):
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.shared_crop = shared_crop
        bicubic = InterpolationMode.BICUBIC
        self._finish = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        self.train_transform = T.RandomResizedCrop(self.image_size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, interpolation=bicubic)
        self.eval_transform = T.Compose([T.Resize(self.image_size, interpolation=bicubic), T.CenterCrop(self.image_size)])

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
