"""The toy world: one shape (circle, square, triangle) in one colour (red, green, blue), filled or outlined, on a
plain light background, captioned "a red circle"; and a programmatic judge that reads an image back.

    scene = Scene("circle", "red", "filled")
    image = draw(scene, np.random.default_rng(0))          # uint8 (64, 64, 3)
    verdict = judge(image[None])                           # {"shape": ["circle"], "color": ["red"], ...}
    caption_correct(verdict, [caption(scene)])             # [True]

The caption names shape and colour, never the style: the style is what a preference can teach. The judge
segments the pixels that differ from the background (the median of the border), keeps the largest
connected component, and reads
  - colour: the nearest palette colour to the component's mean;
  - style: the component's area over the area with its holes filled (a filled shape ≈ 1, an outline
    well below);
  - shape: the filled area over its bounding box (square ≈ 1, circle ≈ π/4, upright triangle ≈ 1/2).
Thresholds sit halfway between the ideal values, so blur and JPEG noise move no drawing across them.
Drawings scale with `size` (shape extent and outline width); the judge is tested at 64 and 32 px, the size
of the pretrained toy pipeline (mapo_jax/toy_pretrain.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
STYLES = ("filled", "outlined")
OUTLINE_WIDTH = 4  # px at 64 px (2 px at 32 px); thinner lines do not survive a /8 VAE
NONE = "none"  # the judge's answer when nothing stands out from the background

# Judge thresholds (see the module docstring): the midpoints between the ideal ratios.
_SQUARE_CIRCLE = (1.0 + np.pi / 4) / 2
_CIRCLE_TRIANGLE = (np.pi / 4 + 0.5) / 2
_FILLED_OUTLINED = 0.8
_FOREGROUND_DIFF = 80  # max-channel distance from the background; shapes are saturated, backgrounds ≥ 200
_MIN_PIXELS = 20


@dataclasses.dataclass(frozen=True)
class Scene:
  shape: str
  color: str
  style: str

  def __post_init__(self):
    for value, allowed in ((self.shape, SHAPES), (self.color, COLORS), (self.style, STYLES)):
      if value not in allowed:
        raise ValueError(f"{value!r} is not one of {list(allowed)}")


def caption(scene: Scene) -> str:
  return f"a {scene.color} {scene.shape}"


def parse_caption(text: str) -> tuple[str, str]:
  """'a red circle' → ('circle', 'red')."""
  words = text.lower().split()
  if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
    raise ValueError(f"{text!r} is not a toy-world caption ('a <colour> <shape>', colours {list(COLORS)}, "
                     f"shapes {list(SHAPES)})")
  return words[2], words[1]


def draw(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
  """The scene at a random size and place on a random light background, uint8 (size, size, 3)."""
  background = tuple(int(c) for c in rng.integers(215, 256, 3))
  image = Image.new("RGB", (size, size), background)
  r = int(rng.integers(size * 3 // 16, size * 5 // 16 + 1))  # half the shape's extent: 12..20 at 64 px
  cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
  color = COLORS[scene.color]
  fill, outline = (color, None) if scene.style == "filled" else (None, color)
  width = OUTLINE_WIDTH * size // SIZE
  draw_ = ImageDraw.Draw(image)
  box = (cx - r, cy - r, cx + r, cy + r)
  if scene.shape == "circle":
    draw_.ellipse(box, fill=fill, outline=outline, width=width)
  elif scene.shape == "square":
    draw_.rectangle(box, fill=fill, outline=outline, width=width)
  else:
    draw_.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=outline, width=width)
  return np.asarray(image)


def random_scene(rng: np.random.Generator, filled_rate: float = 0.5) -> Scene:
  """A uniform shape and colour; filled with probability `filled_rate`, else outlined."""
  return Scene(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))],
               "filled" if rng.random() < filled_rate else "outlined")


def _judge_one(image: np.ndarray) -> tuple[str, str, str]:
  x = np.asarray(image, np.int32)
  border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
  background = np.median(border, axis=0)
  mask = np.max(np.abs(x - background), axis=-1) > _FOREGROUND_DIFF
  labels, n = ndimage.label(mask)
  if n == 0:
    return NONE, NONE, NONE
  sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
  component = labels == 1 + int(np.argmax(sizes))
  if component.sum() < _MIN_PIXELS:
    return NONE, NONE, NONE
  mean = x[component].mean(axis=0)
  palette = np.asarray(list(COLORS.values()), np.float64)
  color = list(COLORS)[int(np.argmin(np.sum((palette - mean) ** 2, axis=-1)))]
  solid = ndimage.binary_fill_holes(component)
  style = "filled" if component.sum() / solid.sum() > _FILLED_OUTLINED else "outlined"
  rows, cols = np.nonzero(solid)
  extent = solid.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
  shape = "square" if extent > _SQUARE_CIRCLE else "circle" if extent > _CIRCLE_TRIANGLE else "triangle"
  return shape, color, style


def judge(images: np.ndarray) -> dict[str, list[str]]:
  """Reads shape, colour and style from uint8 images (N, H, W, 3); NONE where no shape stands out."""
  verdicts = [_judge_one(image) for image in np.asarray(images)]
  return {k: [v[i] for v in verdicts] for i, k in enumerate(("shape", "color", "style"))}


def caption_correct(verdict: dict[str, list[str]], captions: Sequence[str]) -> np.ndarray:
  """bool (N,): image i shows the shape and colour that caption i names."""
  wanted = [parse_caption(c) for c in captions]
  return np.array([(s, c) == w for s, c, w in zip(verdict["shape"], verdict["color"], wanted)])


def filled_rate(verdict: dict[str, list[str]]) -> float:
  return float(np.mean([s == "filled" for s in verdict["style"]]))
