"""The toy world: one shape (circle, square, triangle) in one colour (red, green, blue), filled or outlined, on a
plain light background, captioned "a red circle"; and a programmatic judge that reads an image back.

    scene = Scene("circle", "red", "filled")
    image = draw(scene, np.random.default_rng(0))          # uint8 (64, 64, 3)
    verdict = judge(image[None])                           # {"shape": ["circle"], "color": ["red"], ...}
    caption_correct(verdict, [caption(scene)])             # [True]

The caption names shape and colour, never the style: the style is what a preference can teach. The judge
segments the pixels that differ from the background (the median of the border), keeps the connected pieces
at least a fifth the size of the largest (an outline broken by gaps stays one shape; specks drop out), and
reads, with the pieces' convex hull (all three shapes are convex, and a hull does not care about gaps):
  - colour: the nearest palette colour to the pieces' mean;
  - style: the pieces' area over their hull's (a filled shape ≈ 1, an outline well below);
  - shape: the hull's area over its bounding box (square ≈ 1, circle ≈ π/4, upright triangle ≈ 1/2).
Thresholds sit halfway between the ideal values, so blur and JPEG noise move no drawing across them.
Drawings scale with `size` (shape extent and outline width); the judge is tested at 64 and 32 px, the size
of the pretrained toy pipeline (mapo_jax/toy/pretrain.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, spatial

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
_PIECE_FRACTION = 0.2  # pieces at least this share of the largest belong to the shape


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


def preference_pair(rng: np.random.Generator, preferred: str = "filled",
                    wrong_loser_prob: float = 1 / 3) -> tuple[Scene, Scene]:
  """(winner, loser) scenes for one caption: the winner shows a uniform shape and colour in the `preferred`
  style; the loser the same shape and colour in the other style, or (with `wrong_loser_prob`) a wrong
  shape or colour in either style. The caption is `caption(winner)`."""
  if preferred not in STYLES:
    raise ValueError(f"preferred={preferred!r} is not one of {list(STYLES)}")
  win = random_scene(rng, filled_rate=float(preferred == "filled"))
  if rng.random() >= wrong_loser_prob:
    return win, Scene(win.shape, win.color, next(s for s in STYLES if s != preferred))
  while True:
    lose = random_scene(rng)
    if (lose.shape, lose.color) != (win.shape, win.color):
      return win, lose


def _hull_area(mask: np.ndarray) -> float:
  """Area of the convex hull of the mask's pixels (unit squares, so a filled square's hull is its pixel count)."""
  rows, cols = np.nonzero(mask)
  corners = np.concatenate([np.stack([rows + dr, cols + dc], axis=-1) for dr in (0, 1) for dc in (0, 1)])
  return float(spatial.ConvexHull(corners).volume)  # in 2-D, the "volume" is the area


def _judge_one(image: np.ndarray) -> tuple[str, str, str]:
  x = np.asarray(image, np.int32)
  border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
  background = np.median(border, axis=0)
  mask = np.max(np.abs(x - background), axis=-1) > _FOREGROUND_DIFF
  labels, n = ndimage.label(mask)
  if n == 0:
    return NONE, NONE, NONE
  sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
  # The shape: every sizeable piece, so an outline broken by gaps still counts whole; specks are noise.
  shape_mask = np.isin(labels, 1 + np.nonzero(sizes >= _PIECE_FRACTION * sizes.max())[0])
  area = shape_mask.sum()
  if area < _MIN_PIXELS:
    return NONE, NONE, NONE
  mean = x[shape_mask].mean(axis=0)
  palette = np.asarray(list(COLORS.values()), np.float64)
  color = list(COLORS)[int(np.argmin(np.sum((palette - mean) ** 2, axis=-1)))]
  hull = _hull_area(shape_mask)
  style = "filled" if area / hull > _FILLED_OUTLINED else "outlined"
  rows, cols = np.nonzero(shape_mask)
  extent = hull / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
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
  return style_rate(verdict, "filled")


def style_rate(verdict: dict[str, list[str]], style: str) -> float:
  """The fraction of images judged in `style` (an image with no shape counts as neither)."""
  return float(np.mean([s == style for s in verdict["style"]]))


def score(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
  """The judge's summary of images sampled for `captions`: caption accuracy and each style's rate."""
  verdict = judge(images)
  return {"caption_accuracy": float(caption_correct(verdict, captions).mean()),
          **{f"{style}_rate": style_rate(verdict, style) for style in STYLES}}
