"""Preference training in the toy world (mapo_jax/toy_world.py) from the pretrained, biased base
(assets/toy_world/, mapo_jax/toy_pretrain.py), with the trainer's own step (mapo_jax/train_step.py):

    python -m mapo_jax.toy_preference --out /tmp/toy_mapo [--objective mapo] [--steps 200]

Pairs: the winner shows the captioned shape and colour, filled; the loser is the same shape and colour
outlined (2/3 of the pairs) or a wrong shape or colour in either style (1/3). The base draws ~10 % filled,
so a preference for filled shapes is one the reference model does not share (MaPO's "reference mismatch",
arXiv 2406.06424). The judge measures the filled rate and caption accuracy of samples on fixed seeds every
`eval_every` steps. Writes curve.json, curve.png (both rates against the step) and before_after.png (the
same seeds before and after, side by side).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

from mapo_jax import objectives, toy_world, train_step
from mapo_jax import toy_pretrain as tp
from mapo_jax.pipelines import empty_prompt_rows, load_pipeline, sd
from mapo_jax.sampling import make_grid

WRONG_LOSER_PROB = 1 / 3


def pair_scenes(rng: np.random.Generator) -> tuple[toy_world.Scene, toy_world.Scene]:
  """(winner, loser): the winner filled with a uniform shape and colour; the loser as described above."""
  win = toy_world.random_scene(rng, filled_rate=1.0)
  if rng.random() >= WRONG_LOSER_PROB:
    return win, toy_world.Scene(win.shape, win.color, "outlined")
  while True:
    lose = toy_world.random_scene(rng)
    if (lose.shape, lose.color) != (win.shape, win.color):
      return win, lose


def world_pairs(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(captions, winner images, loser images) at tp.SIZE px."""
  rng = np.random.default_rng(seed)
  scenes = [pair_scenes(rng) for _ in range(n)]
  draw = lambda s: toy_world.draw(s, rng, tp.SIZE)
  wins, loses = zip(*[(draw(w), draw(l)) for w, l in scenes])
  return [toy_world.caption(w) for w, _ in scenes], np.stack(wins), np.stack(loses)


def align(pipe, objective: str, *, steps: int, batch: int, lr: float, seed: int = 0, num_pairs: int = 2048,
          eval_every: int = 20, per_caption: int = 10, hparams: dict | None = None, log=print):
  """Trains pipe.unet on world pairs; returns (curve [{step, caption_accuracy, filled_rate}], images before,
  images after) with the samples judged on fixed seeds (seed 0) at every evaluation."""
  captions, wins, loses = world_pairs(num_pairs, seed=30_000 + seed)
  moments_w, moments_l = tp.encode_world(pipe.vae, wins), tp.encode_world(pipe.vae, loses)
  names = tp.all_captions()
  cond = {k: np.asarray(v) for k, v in jax.device_get(pipe.encode_prompts(names)).items()}
  which = np.array([names.index(c) for c in captions])
  time_ids = sd.time_ids(tp.SIZE, tp.SIZE, batch)

  graphdef, params, rest = nnx.split(pipe.unet, nnx.Param, ...)
  params = jax.tree.map(np.array, params)  # a copy: the step donates its state, pipe.unet stays usable
  reference = None
  if objectives.needs_reference(objective):
    reference = jax.tree.map(np.asarray, nnx.state(pipe.unet))  # the base, frozen
  tx = optax.adamw(lr, weight_decay=0.0)
  spec = objectives.get_objective(objective)
  cfg = train_step.StepConfig(objective, spec.hparams(hparams, num_timesteps=pipe.schedule.num_train_timesteps),
                              pipe.latents, empty_prompt_prob=tp.EMPTY_PROMPT_PROB)
  ref_graphdef = nnx.graphdef(pipe.unet)
  step_fn = jax.jit(train_step.make_train_step(pipe.denoise, graphdef, ref_graphdef, tx, pipe.schedule, cfg),
                    donate_argnums=0)
  state = train_step.init_state(params, tx, seed)
  frozen = train_step.Frozen(policy=rest, reference=reference, empty_prompt=empty_prompt_rows(pipe))

  curve, first = [], None

  def evaluate(i):
    scores, images = tp.judge_samples(pipe, (graphdef, state.params, rest), per_caption=per_caption)
    curve.append({"step": i, **scores})
    log(f"{objective} step {i}: caption accuracy {scores['caption_accuracy']:.3f}, "
        f"filled {scores['filled_rate']:.3f}")
    return images

  first = evaluate(0)
  rng = np.random.default_rng(seed)
  for i in range(1, steps + 1):
    idx = rng.integers(0, num_pairs, batch)
    b = {"moments_w": moments_w[idx], "moments_l": moments_l[idx], "prompt_embeds": cond["prompt_embeds"][which[idx]],
         "pooled_prompt_embeds": cond["pooled_prompt_embeds"][which[idx]], "time_ids": time_ids}
    state, _ = step_fn(state, b, frozen)
    if i % eval_every == 0 or i == steps:
      last = evaluate(i)
  return curve, first, last


def before_after(before: np.ndarray, after: np.ndarray, cols: int) -> np.ndarray:
  """One image: the grid before, a white gap, the grid after (same seeds, same places)."""
  a, b = make_grid(before, cols), make_grid(after, cols)
  gap = np.full((a.shape[0], 8, 3), 255, np.uint8)
  return np.concatenate([a, gap, b], axis=1)


def plot_curve(curve: list[dict], size=(480, 300)) -> Image.Image:
  """Filled rate (blue) and caption accuracy (black) against the step, on [0, 1], drawn with PIL."""
  w, h = size
  left, right, top, bottom = 40, 10, 10, 30
  image = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(image)
  last = max(p["step"] for p in curve) or 1
  xy = lambda s, v: (left + (w - left - right) * s / last, top + (h - top - bottom) * (1 - v))
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    d.line([xy(0, v), xy(last, v)], fill=(220, 220, 220))
    d.text((4, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
  d.text((left, h - bottom + 8), f"step 0 .. {last}", fill="black")
  for key, color in (("filled_rate", (40, 70, 220)), ("caption_accuracy", (0, 0, 0))):
    d.line([xy(p["step"], p[key]) for p in curve], fill=color, width=2)
    d.text((w - 150, xy(last, curve[-1][key])[1] - 14), key.replace("_", " "), fill=color)
  return image


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--pipeline", type=Path, default=tp.ASSETS)
  parser.add_argument("--objective", default="mapo", choices=sorted(objectives.OBJECTIVES))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", type=float, default=1e-4)  # untuned: 1e-3 took filled to 99 % in 5 steps and broke captions
  parser.add_argument("--eval-every", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  log = lambda message: print(f"[{time.time() - start:7.1f} s] {message}", flush=True)
  curve, before, after = align(load_pipeline(args.pipeline), args.objective, steps=args.steps, batch=args.batch,
                               lr=args.lr, seed=args.seed, eval_every=args.eval_every, log=log)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
  plot_curve(curve).save(args.out / "curve.png")
  Image.fromarray(before_after(before, after, 10)).save(args.out / "before_after.png")
  log(f"before: {curve[0]}\nafter:  {curve[-1]}")


if __name__ == "__main__":
  main()
