"""Preference training in the toy world (mapo_jax/toy/world.py) from a pretrained, biased base (the SDXL-layout
mapo_jax/toy/base/ or its FLUX.1 twin mapo_jax/toy/flux_base/; mapo_jax/toy/pretrain.py), with the trainer's own
step (mapo_jax/training/train_step.py), fast enough to run every objective many times (bench/reference_mismatch.py,
tests/test_toy_preference.py):

    aligner = Aligner(demo.load_toy(demo.BASE))      # or demo.load_toy(demo.FLUX_BASE)
    run = aligner.run("mapo", preferred="filled", lr=1e-4, steps=100, seed=0)
    run.curve    # [{"step", "caption_accuracy", "filled_rate", "outlined_rate"}, ...] on fixed sampling seeds

Pairs (toy_world.preference_pair): the winner shows the captioned shape and colour in the `preferred` style;
the loser the other style, or a wrong shape or colour. The base draws ~10 % filled shapes, so preferring
"filled" is a preference the reference model does not share (MaPO's reference mismatch, arXiv 2406.06424);
preferring "outlined" is one it already holds.

Every run with the same `seed` sees the same pairs, the same batches and the same noise, whatever the
objective or learning rate. The learning rate is an optimizer state (optax.inject_hyperparams), so runs of
one objective share one compiled step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mapo_jax.training import objectives
from mapo_jax.toy import world as toy_world
from mapo_jax.training import train_step
from mapo_jax.toy import pretrain as tp
from mapo_jax.pipelines import empty_prompt_rows, family

NUM_PAIRS = 2048
WARMUP_STEPS = 10


def world_pairs(n: int, seed: int, preferred: str = "filled") -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
  """(captions, winner images, loser images, scores (n, 2)) at tp.SIZE px. A scene's score is what a perfect
  reward model would give: 1 for the captioned shape and colour plus 1 for the preferred style."""
  rng = np.random.default_rng(seed)
  scenes = [toy_world.preference_pair(rng, preferred) for _ in range(n)]
  draw = lambda s: toy_world.draw(s, rng, tp.SIZE)
  wins, loses = zip(*[(draw(w), draw(l)) for w, l in scenes])
  captions = [toy_world.caption(w) for w, _ in scenes]
  value = lambda s, c: float(toy_world.caption(s) == c) + float(s.style == preferred)
  scores = np.array([[value(w, c), value(l, c)] for (w, l), c in zip(scenes, captions)], np.float32)
  return captions, np.stack(wins), np.stack(loses), scores


@dataclasses.dataclass
class Run:
  curve: list[dict]  # judged samples on fixed seeds, every eval_every steps (step 0: the base)
  before: np.ndarray  # the step-0 samples (uint8), caption-major
  after: np.ndarray  # the last step's samples, same seeds
  final: dict  # the last step's model judged on more samples, on other seeds (sampling seed 1)


# SmPO's scores here are toy_world scores (0..2), not PickScore logits: its soft label uses their difference.
TOY_HPARAMS = {"smpo": {"score_scale": 1.0}}


class Aligner:
  """Runs objectives on toy-world pairs from one base pipeline; caches encoded pairs and compiled steps."""

  def __init__(self, pipe, *, batch: int = 16, num_pairs: int = NUM_PAIRS):
    self.pipe, self.batch, self.num_pairs = pipe, batch, num_pairs
    names = tp.all_captions()
    self.names = names
    self.cond = {k: np.asarray(v) for k, v in jax.device_get(pipe.encode_prompts(names)).items()}
    self.graphdef, params, self.rest = nnx.split(pipe.denoiser, nnx.Param, ...)
    self.base = jax.tree.map(np.array, params)  # a copy: steps donate their state
    self.reference = jax.tree.map(np.asarray, nnx.state(pipe.denoiser))
    # The FLUX twin trains at the embedded guidance it was pretrained at; SDXL's fixed micro-conditioning rows.
    self.guidance = tp.FLUX_TRAIN_GUIDANCE if tp.is_flux(pipe) else None
    time_ids = getattr(family(pipe.path), "time_ids", None)
    self.extra = {"time_ids": time_ids(tp.SIZE, tp.SIZE, batch)} if time_ids else {}
    # Adam, a linear warm-up over WARMUP_STEPS, then the learning rate (a state entry: one compile for all).
    warmup = optax.linear_schedule(1 / WARMUP_STEPS, 1.0, WARMUP_STEPS - 1)
    self.tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(warmup),
                          optax.inject_hyperparams(optax.scale)(step_size=0.0))
    self._data, self._steps = {}, {}

  def data(self, preferred: str, seed: int) -> dict[str, np.ndarray]:
    key = (preferred, seed)
    if key not in self._data:
      captions, wins, loses, scores = world_pairs(self.num_pairs, 30_000 + seed, preferred)
      which = np.array([self.names.index(c) for c in captions])
      self._data[key] = {"moments_w": tp.encode_world(self.pipe.vae, wins),
                         "moments_l": tp.encode_world(self.pipe.vae, loses),
                         **{k: v[which] for k, v in self.cond.items()},
                         "score_w": scores[:, 0], "score_l": scores[:, 1]}
    return self._data[key]

  def step_fn(self, objective: str, hparams: dict | None = None):
    hparams = {**TOY_HPARAMS.get(objective, {}), **(hparams or {})}
    key = (objective, tuple(sorted(hparams.items())))
    if key not in self._steps:
      spec = objectives.get_objective(objective)
      cfg = train_step.StepConfig(objective, spec.hparams(hparams, num_timesteps=self.pipe.schedule.num_train_timesteps),
                                  self.pipe.latents, empty_prompt_prob=tp.EMPTY_PROMPT_PROB, guidance=self.guidance)
      step = train_step.make_train_step(self.pipe.denoise, self.graphdef, nnx.graphdef(self.pipe.denoiser), self.tx,
                                        self.pipe.schedule, cfg)
      self._steps[key] = jax.jit(step, donate_argnums=0)
    return self._steps[key]

  def run(self, objective: str, *, preferred: str = "filled", lr: float, steps: int, seed: int = 0,
          eval_every: int = 20, per_caption: int = 10, final_per_caption: int = 30, hparams: dict | None = None,
          log=None) -> Run:
    """Trains a copy of the base on `seed`'s pairs; judges `per_caption` samples per caption (sampling seed
    0) at step 0, every `eval_every` steps and at the end, and `final_per_caption` (seed 1) at the end."""
    data = self.data(preferred, seed)
    step_fn = self.step_fn(objective, hparams)
    state = train_step.init_state(jax.tree.map(jnp.array, self.base), self.tx, seed)
    state.opt_state[-1].hyperparams["step_size"] = jnp.asarray(-lr, jnp.float32)  # descend
    reference = self.reference if objectives.needs_reference(objective) else None
    frozen = train_step.Frozen(policy=self.rest, reference=reference, empty_prompt=empty_prompt_rows(self.pipe))
    rpo = objective == "rpo"
    curve, images = [], {}

    def evaluate(i):
      scores, images[i] = tp.judge_samples(self.pipe, (self.graphdef, state.params, self.rest),
                                           per_caption=per_caption)
      curve.append({"step": i, **scores})
      if log:
        log(f"{objective} lr {lr:g} seed {seed} step {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    evaluate(0)
    rng = np.random.default_rng(seed)
    for i in range(1, steps + 1):
      idx = rng.integers(0, self.num_pairs, self.batch)
      batch = {k: v[idx] for k, v in data.items()}
      batch.update(self.extra)
      if rpo:  # RPO's per-pair embedding: the caption's pooled text embedding (config.data.rpo_embedding)
        batch[train_step.EMBEDDING_KEY] = batch["pooled_prompt_embeds"]
      state, _ = step_fn(state, batch, frozen)
      if i % eval_every == 0 or i == steps:
        evaluate(i)
    final, _ = tp.judge_samples(self.pipe, (self.graphdef, state.params, self.rest), per_caption=final_per_caption,
                                seed=1)
    return Run(curve, images[0], images[steps], final)
