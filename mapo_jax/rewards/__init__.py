"""Reward models behind one interface: `load_reward(kind, path)` → a scorer of (prompts, uint8 images).

    scorer = load_reward("pickscore", "/ckpt/PickScore_v1")
    scores = scorer(["a red circle", ...], images)   # images: uint8 (N, H, W, 3) → float32 (N,)

Kinds and what PATH is (docs/rewards.md has the formulas and sources):
  pickscore  a transformers CLIPModel folder (yuvalkirstain/PickScore_v1 + the processor files of its base):
             logit_scale.exp() · cos(image, text)
  clip       a transformers CLIPModel folder: CLIP score 100 · max(cos, 0)
  hps        an HPS v2 / v2.1 open_clip ViT-H-14 state-dict file (HPS_v2.1_compressed.pt, or a .safetensors
             copy): cos(image, text), no logit scale
  aesthetic  the LAION aesthetic predictor head file (sac+logos+ava1-l14-linearMSE.pth) inside a transformers
             CLIP ViT-L/14 folder (openai/clip-vit-large-patch14), or that folder: MLP(normalised image embedding)
  imagereward  ImageReward.pt (or a .safetensors copy) with med_config.json and bert-base-uncased's vocab.txt
             beside it, or their folder: (MLP(BLIP text-image [CLS] state) - mean) / std

Each scorer holds its parameters replicated over a mesh (default: all devices on one `data` axis) and runs
one jitted program per batch, the batch sharded over every mesh axis; batches are padded to `batch_size`
rounded up to a multiple of the device count, so one compile serves every call. With several processes
(multi-host), every process calls the scorer with the same prompts and images and gets all the scores. Command lines name rewards
as `kind=PATH` items separated by commas (`parse_rewards`).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class Reward(Protocol):
  kind: str

  def __call__(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    """Score of prompt i with image i, float32 (N,), for uint8 images (N, H, W, 3)."""


def _normalize(e):
  e = e.astype(jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


# Score functions (model, token ids or None, preprocessed pixels) → (B,), jitted by `_scores`.
def _pickscore(model, ids, pixels):
  return model(ids, pixels)["score"]


def _clip_score(model, ids, pixels):
  return 100 * jnp.maximum(model(ids, pixels)["cosine"], 0)


def _hps(model, ids, pixels):
  return jnp.sum(_normalize(model.encode_image(pixels)) * _normalize(model.encode_text(ids)), axis=-1)


def _aesthetic(model, ids, pixels):
  del ids  # image-only
  return model(pixels)


def _scores(graphdef, score_fn, state, ids, pixels):
  return score_fn(nnx.merge(graphdef, state), ids, pixels).astype(jnp.float32)


def _place(tree, sharding: NamedSharding):
  """Host arrays (the same on every process) as global arrays with `sharding`; each process hands over only
  its own devices' blocks, so this works on one host and on many."""
  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh (axis `data`) over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",))


class Scorer:
  """A reward model ready to score: `model` with `score_fn`, its `tokenize` (prompts → int32 ids, or None
  for image-only rewards) and `preprocess` (uint8 (N, H, W, 3) → float32 pixels)."""

  def __init__(self, kind: str, model: nnx.Module, score_fn: Callable, preprocess: Callable,
               tokenize: Callable | None = None, *, batch_size: int = 8, mesh: Mesh | None = None):
    self.kind, self.score_fn, self.preprocess, self.tokenize = kind, score_fn, preprocess, tokenize
    self.mesh = data_mesh() if mesh is None else mesh
    self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(self.mesh, P())
    self._state = _place(state, replicated)
    self._batch = NamedSharding(self.mesh, P(self.mesh.axis_names))
    # Scores come back replicated, so every process can read all of them.
    self._run = jax.jit(functools.partial(_scores, graphdef, score_fn), out_shardings=replicated)

  def __call__(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{self.kind}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    n = len(images)
    if len(prompts) != n:
      raise ValueError(f"{self.kind}: {len(prompts)} prompts for {n} images")
    parts = []
    for start in range(0, n, self.batch_size):
      idx = [min(i, n - 1) for i in range(start, start + self.batch_size)]  # the last item repeated as padding
      ids = None if self.tokenize is None else _place(self.tokenize([prompts[i] for i in idx]), self._batch)
      out = self._run(self._state, ids, _place(self.preprocess(images[idx]), self._batch))
      parts.append(np.asarray(out.addressable_data(0))[:min(self.batch_size, n - start)])
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _folder(kind: str, path: str | os.PathLike, what: str) -> Path:
  path = Path(path)
  if not path.is_dir():
    raise ValueError(f"{kind}: {path} is not a folder; expected {what}")
  if not (path / "config.json").is_file():
    raise ValueError(f"{kind}: {path} has no config.json; expected {what}")
  return path


def _load_clip_folder(kind: str, path, **options) -> Scorer:
  from mapo_jax.rewards.clip import load_reward_model, preprocess
  folder = _folder(kind, path, "a transformers CLIPModel folder")
  reward = load_reward_model(folder)
  length = reward.model.text_cfg.max_position_embeddings
  tokenize = lambda prompts: reward.tokenizer(list(prompts), padding="max_length", max_length=length,
                                              truncation=True, return_tensors="np")["input_ids"].astype(np.int32)
  return Scorer(kind, reward.model, _pickscore if kind == "pickscore" else _clip_score,
                lambda images: preprocess(images, reward.processor_config), tokenize, **options)


HPS_CONFIG_FILE = "open_clip_config.json"


def _load_hps(path, **options) -> Scorer:
  """HPS v2 / v2.1: the state-dict file; an open_clip_config.json beside it (open_clip's hub format,
  {"model_cfg": ..., "preprocess_cfg": {"mean", "std"}}) overrides the ViT-H-14 architecture."""
  from mapo_jax.rewards import open_clip
  from mapo_jax.rewards.image_transforms import OPENAI_MEAN, OPENAI_STD, clip_eval_transform
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"hps: {path} is not a file; expected the HPS v2 checkpoint (HPS_v2.1_compressed.pt, "
                     "or a .safetensors copy)")
  config_file = path.parent / HPS_CONFIG_FILE
  hub = json.loads(config_file.read_text()) if config_file.is_file() else {}
  model = open_clip.load_open_clip(path, hub.get("model_cfg", open_clip.VIT_H_14))
  cfg, pre = model.cfg, hub.get("preprocess_cfg", {})
  size, length = cfg.vision_cfg["image_size"], cfg.text_cfg["context_length"]
  mean, std = pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)
  tokenizer = open_clip.load_tokenizer(path.parent)
  # hpsv2 resizes the float tensor (ToTensor before Resize): see image_transforms.
  return Scorer("hps", model, _hps,
                lambda images: clip_eval_transform(images, size, mean=mean, std=std, resize_uint8=False),
                lambda prompts: open_clip.tokenize(tokenizer, prompts, length), **options)


def _aesthetic_files(path: Path) -> tuple[Path, Path]:
  """(head file, CLIP folder) for an `aesthetic` PATH: the head file inside the CLIP folder, or the folder
  holding exactly one .pth / .pt file."""
  if path.is_file():
    return path, path.parent
  heads = sorted(p for p in path.glob("*") if p.suffix in (".pth", ".pt")) if path.is_dir() else []
  if len(heads) != 1:
    raise ValueError(f"aesthetic: {path} is neither the head file (sac+logos+ava1-l14-linearMSE.pth) nor a "
                     f"folder holding exactly one .pth/.pt head file (found {[p.name for p in heads]})")
  return heads[0], path


def _load_aesthetic(path, **options) -> Scorer:
  from mapo_jax.rewards.aesthetic import load_aesthetic, read_head
  from mapo_jax.rewards.image_transforms import OPENAI_MEAN, OPENAI_STD, clip_eval_transform
  head, folder = _aesthetic_files(Path(path))
  read_head(head)  # a checkpoint of another kind is named as such before its folder is looked at
  _folder("aesthetic", folder, "the head file inside a transformers CLIP ViT-L/14 folder")
  model = load_aesthetic(head, folder)
  size = model.clip.vision_model.embeddings.image_size
  processor = folder / "preprocessor_config.json"
  pre = json.loads(processor.read_text()) if processor.is_file() else {}
  mean, std = pre.get("image_mean", OPENAI_MEAN), pre.get("image_std", OPENAI_STD)
  # OpenAI CLIP's preprocess (the predictor's): resize the PIL image, then ToTensor.
  return Scorer("aesthetic", model, _aesthetic,
                lambda images: clip_eval_transform(images, size, mean=mean, std=std, resize_uint8=True), **options)


def _image_reward(model, inputs, pixels):
  ids, mask = inputs
  return model(ids, mask, pixels)


IMAGE_REWARD_FILE = "ImageReward.pt"


def _load_image_reward(path, **options) -> Scorer:
  """ImageReward: the checkpoint file (ImageReward.pt, or a .safetensors copy), or the folder holding
  ImageReward.pt; beside it med_config.json and bert-base-uncased's vocab.txt."""
  from transformers import BertTokenizer
  from mapo_jax.rewards import image_reward
  from mapo_jax.rewards.image_transforms import clip_eval_transform
  path = Path(path)
  file = path / IMAGE_REWARD_FILE if path.is_dir() else path
  if not file.is_file():
    raise ValueError(f"imagereward: {path} is neither the checkpoint file nor a folder holding {IMAGE_REWARD_FILE}")
  folder = file.parent
  model = image_reward.load_image_reward(file)
  if not (folder / "vocab.txt").is_file():
    raise FileNotFoundError(f"{folder} has no vocab.txt (ImageReward's tokenizer is bert-base-uncased's)")
  tokenizer = BertTokenizer(str(folder / "vocab.txt"))

  def tokenize(prompts):
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=image_reward.MAX_LENGTH,
                    return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

  size = model.cfg.image_size
  # ImageReward's _transform: OpenAI CLIP's preprocess (resize the PIL image, then ToTensor).
  return Scorer("imagereward", model, _image_reward,
                lambda images: clip_eval_transform(images, size, resize_uint8=True), tokenize, **options)


LOADERS: dict[str, Callable[..., Scorer]] = {
    "pickscore": functools.partial(_load_clip_folder, "pickscore"),
    "clip": functools.partial(_load_clip_folder, "clip"),
    "hps": _load_hps,
    "aesthetic": _load_aesthetic,
    "imagereward": _load_image_reward,
}


def load_reward(kind: str, path: str | os.PathLike, *, batch_size: int = 8, mesh: Mesh | None = None) -> Reward:
  """The scorer of reward `kind` from `path` (see the module docstring). `batch_size` images per jitted call
  (rounded up to a multiple of the mesh's devices); `mesh`: where the batch is sharded (default: all
  devices, 1-D)."""
  if kind not in LOADERS:
    raise ValueError(f"reward kind {kind!r} (for {path}); expected one of {sorted(LOADERS)}")
  return LOADERS[kind](path, batch_size=batch_size, mesh=mesh)


def parse_rewards(spec: str) -> dict[str, str]:
  """'pickscore=DIR,hps=FILE' → {"pickscore": "DIR", "hps": "FILE"}, kinds checked, in the given order."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    kind, sep, path = item.partition("=")
    if not sep or not path:
      raise ValueError(f"reward {item!r}: expected KIND=PATH, e.g. pickscore=/ckpt/PickScore_v1")
    if kind not in LOADERS:
      raise ValueError(f"reward {item!r}: unknown kind {kind!r}; expected one of {sorted(LOADERS)}")
    if kind in out:
      raise ValueError(f"reward kind {kind!r} given twice in {spec!r}")
    out[kind] = path
  if not out:
    raise ValueError(f"no rewards in {spec!r}; expected KIND=PATH[,KIND=PATH...]")
  return out
