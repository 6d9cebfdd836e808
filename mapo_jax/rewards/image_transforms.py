"""torchvision's evaluation transform of CLIP-family reward models, in NumPy + PIL.

    Resize(size, bicubic) → CenterCrop(size) → ToTensor → Normalize(mean, std)

as OpenAI CLIP's `clip.load` preprocess and open_clip's `image_transform(is_train=False)` compose it.
Two orders exist, and both are used by released reward models:
  resize_uint8=True   resize the PIL image (8-bit result), then ToTensor: OpenAI CLIP (the LAION
                      aesthetic predictor), open_clip.
  resize_uint8=False  ToTensor first, then resize the float tensor (antialiased bicubic, torchvision's
                      default since 0.17): the hpsv2 package's copy of open_clip. PIL's float ("F")
                      resampling computes the same filter without rounding to 8 bits.
Resize scales the shorter side to `size` (the longer to int(size · long / short)); the crop offset is
round((len - size) / 2) as torchvision rounds it (transformers' CLIPImageProcessor floors instead).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
  return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)


def _resize(image: np.ndarray, size: int, resize_uint8: bool) -> np.ndarray:
  """uint8 (H, W, 3) → float32 (h, w, 3) in [0, 1] (beyond it where float bicubic overshoots)."""
  h, w = image.shape[:2]
  new_h, new_w = _resized_size(h, w, size)
  if resize_uint8:
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    return image.astype(np.float32) / np.float32(255)
  x = image.astype(np.float32) / np.float32(255)
  if (new_h, new_w) == (h, w):
    return x
  return np.stack([np.asarray(Image.fromarray(x[..., c], mode="F").resize((new_w, new_h), Image.BICUBIC))
                   for c in range(x.shape[-1])], axis=-1)


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
  h, w = x.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return x[top:top + size, left:left + size]


def clip_eval_transform(images: np.ndarray, size: int, *, mean: Sequence[float] = OPENAI_MEAN,
                        std: Sequence[float] = OPENAI_STD, resize_uint8: bool = True) -> np.ndarray:
  """uint8 (B, H, W, 3) images → float32 (B, size, size, 3), normalised (see the module docstring)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return np.stack([(center_crop(_resize(image, size, resize_uint8), size) - mean) / std for image in images])
