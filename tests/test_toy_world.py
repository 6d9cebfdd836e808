"""The toy world's judge against drawings whose truth is known (mapo_jax/toy/world.py)."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mapo_jax.toy import world as tw

ATTRIBUTES = ("shape", "color", "style")


def _drawn(n, seed, size=tw.SIZE):
  rng = np.random.default_rng(seed)
  scenes = [tw.random_scene(rng) for _ in range(n)]
  return scenes, np.stack([tw.draw(s, rng, size) for s in scenes])


def _jpeg(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return np.asarray(Image.open(buf))


def _blur(image):  # softer edges, as a small VAE's decodings have: 1 px at 64 px, scaled with the size
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(image.shape[0] / 64)))


@pytest.mark.parametrize("size", [64, 32])  # 32 px: the pretrained toy pipeline's size (toy_pretrain.py)
@pytest.mark.parametrize("degrade", [None, _jpeg, _blur], ids=["raw", "jpeg", "blur"])
def test_judge_reads_drawings(degrade, size):
  scenes, images = _drawn(300, seed=0, size=size)
  if degrade is not None:
    images = np.stack([degrade(x) for x in images])
  verdict = tw.judge(images)
  for k in ATTRIBUTES:
    accuracy = np.mean([got == getattr(s, k) for got, s in zip(verdict[k], scenes)])
    assert accuracy >= 0.98, (k, accuracy)
  correct = tw.caption_correct(verdict, [tw.caption(s) for s in scenes])
  assert correct.mean() >= 0.98
  assert abs(tw.filled_rate(verdict) - np.mean([s.style == "filled" for s in scenes])) <= 0.02


def test_judge_on_blank_and_wrong_captions():
  blank = np.full((2, tw.SIZE, tw.SIZE, 3), 240, np.uint8)
  assert tw.judge(blank) == {k: [tw.NONE] * 2 for k in ATTRIBUTES}
  image = tw.draw(tw.Scene("square", "blue", "filled"), np.random.default_rng(0))
  verdict = tw.judge(np.stack([image, image]))
  assert tw.caption_correct(verdict, ["a blue square", "a red square"]).tolist() == [True, False]


def test_bad_scene_and_caption_name_the_value():
  with pytest.raises(ValueError, match="'hexagon'"):
    tw.Scene("hexagon", "red", "filled")
  with pytest.raises(ValueError, match="'a purple circle'"):
    tw.parse_caption("a purple circle")


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_judge_reads_outlines_broken_by_a_gap(shape):
  # A small decoder's outlines come out with gaps: the judge must still see one outlined shape.
  rng = np.random.default_rng(1)
  for _ in range(20):
    image = tw.draw(tw.Scene(shape, "green", "outlined"), rng, 32).copy()
    background = image[0, 0].copy()
    rows, cols = np.nonzero(np.any(image != background, axis=-1))
    bottom, middle = rows.max(), (cols.min() + cols.max()) // 2
    image[bottom - 3:bottom + 1, middle - 1:middle + 2] = background  # cut the bottom edge, 3 px wide
    verdict = tw.judge(image[None])
    assert (verdict["shape"][0], verdict["color"][0], verdict["style"][0]) == (shape, "green", "outlined")
