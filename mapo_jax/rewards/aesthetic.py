"""The LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor) in Flax NNX.

score = head(e / ‖e‖), e = CLIP ViT-L/14's image embedding (OpenAI CLIP `encode_image`, i.e. transformers'
`get_image_features`), head = the repository's `MLP.layers`:
  Linear(768, 1024) → Dropout → Linear(1024, 128) → Dropout → Linear(128, 64) → Dropout → Linear(64, 16)
  → Linear(16, 1)
with no activations between the linear maps (the released `sac+logos+ava1-l14-linearMSE.pth` was trained
so, with an MSE loss on 1-10 ratings). The state-dict keys are `layers.{0,2,4,6,7}.{weight,bias}`.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from mapo_jax import convert
from mapo_jax.convert import torch_pickle
from mapo_jax.models.layers import Dropout, Linear, Options
from mapo_jax.rewards.clip import CLIPModel, load_clip_model

HIDDEN = (1024, 128, 64, 16)
HEAD_KEYS = tuple(f"layers.{i}.{leaf}" for i in (0, 2, 4, 6, 7) for leaf in ("weight", "bias"))


class AestheticHead(nnx.Module):
  def __init__(self, in_features: int, *, options: Options = Options(), rngs: nnx.Rngs):
    kw = dict(dtype=options.dtype, param_dtype=options.param_dtype, rngs=rngs)
    a, b, c, d = HIDDEN
    self.layers = nnx.List([Linear(in_features, a, **kw), Dropout(), Linear(a, b, **kw), Dropout(),
                            Linear(b, c, **kw), Dropout(), Linear(c, d, **kw), Linear(d, 1, **kw)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x[..., 0]


class AestheticPredictor(nnx.Module):
  """A CLIP model's image tower and the head. Call: pixels (B, S, S, 3), CLIP-normalised → scores (B,)."""

  def __init__(self, clip: CLIPModel, head: AestheticHead):
    self.clip, self.head = clip, head

  def __call__(self, pixels):
    e = self.clip.image_embeds(pixels).astype(jnp.float32)
    return self.head(e / jnp.linalg.norm(e, axis=-1, keepdims=True))


def read_head(path: str | os.PathLike) -> dict:
  """The head's state dict from a torch.save file or a .safetensors file; ValueError naming the file when
  its keys are not the predictor's."""
  path = Path(path)
  if path.suffix == ".safetensors":
    state = convert.read_weights(path.parent, path.name.removesuffix(".safetensors"))
  else:
    state = torch_pickle.load(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
  if not isinstance(state, dict) or set(state) != set(HEAD_KEYS):
    keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path} is not a LAION aesthetic-predictor head: expected keys {list(HEAD_KEYS)}, "
                     f"found {keys}{' ...' if isinstance(state, dict) and len(state) > 6 else ''}")
  return state


def load_aesthetic(head_path: str | os.PathLike, clip_folder: str | os.PathLike, dtype=jnp.float32, *,
                   param_dtype=jnp.float32) -> AestheticPredictor:
  """The head file `head_path` on the transformers CLIPModel folder `clip_folder` (openai/clip-vit-large-patch14)."""
  state = read_head(head_path)
  clip = load_clip_model(clip_folder, dtype, param_dtype=param_dtype)
  width = clip.visual_projection.kernel.shape[1]
  options = Options(dtype=dtype, param_dtype=param_dtype)
  head = nnx.eval_shape(lambda: AestheticHead(width, options=options, rngs=nnx.Rngs(0)))
  convert.load_state_dict(head, state, source=str(head_path))
  return AestheticPredictor(clip, head)
