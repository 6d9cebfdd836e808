"""One jitted training step for every objective: shared noise and timestep per pair, one denoiser call on
the 2B stacked latents (winners first), per-sample float32 errors, the objective, the optimizer update.

The step knows no model family: it receives the family's `denoise(model, x, t, cond)` and `Latents`
(mapo_jax/pipelines/). Nor does it branch on the schedule: the training times, the forward process, the regression
target and the loss weights come from mapo_jax/diffusion.py (`training_times`, `noisy_latents`,
`regression_target`, `loss_weights`), which dispatch on its type. Conventions (docs/objectives.md; the official
MaPO and Diffusion-DPO trainers): winner i and loser i share noise and training time (DDPM: an integer timestep
t ~ U{0..T-1}; flow matching: one sigma from the density of `StepConfig.flow`, as diffusers'
train_dreambooth_lora_flux.py / _sd3.py draw it, and the model time sigma * T); latents are VAE posterior samples,
normalised by `Latents`; reductions are plain means over the global batch. Random draws are made for the
whole global batch before it is split into micro-batches, so for the per-pair objectives (MaPO, DPO, SFT)
accumulating k micro-batches equals one step on the k-times larger batch. RPO compares every pair with
every other pair of the *same micro-batch* (its B x B matrix spans one micro-batch across all devices), so
with accum_steps = k > 1 it is not the same as one step on the whole global batch.

Before the noise, the step may fix the time ids, add the guidance a guidance-distilled model is trained at
(`StepConfig.guidance`: FLUX.1-dev's embedded guidance scale), swap captions for the empty prompt and swap winners
with losers (`prepare_batch`, `augment_batch`): per pair, for the whole global batch, from a key folded from
the step's key, so a resumed run takes the same choices. A batch of token ids (a token ids cache: keys
TEXT_IDS_PREFIX + tower name, docs/data.md "Text conditioning at scale") is then encoded by the frozen text towers
(`TextEncoder`, their parameters in `Frozen.text`), once for the whole global batch (`encode_text`): the empty
prompt is swapped in as ids, before the encoding, as the official Diffusion-DPO trainer replaces the caption by ""
before its text encoders.

The objective sees per-sample statistics (`per_sample_statistics`: errors, the reference's errors and
deviations, the winner-loser residual product), optionally weighted per sample (`diffusion.loss_weights`: DDPM's
min-SNR, flow matching's sigma_sqrt / cosmap), with the
loser's gradient optionally scaled by the SDPO safeguard. An unpaired batch (`moments`, `label`: KTO)
is denoised one sample per row; a pair batch feeds KTO as two samples per pair (`pairs_as_unpaired`).
Objectives that take a statistic of the whole micro-batch (RPO's matrix, KTO's z0, DSPO's sdxl switch,
the safeguard's lambda) see one micro-batch under accumulation, as their sources do. With an EMA
(`StepConfig.ema_decay`) the state carries `ema`, updated after every step.

With a reference model, the policy's forward sees its parameters rounded to the reference's storage dtype
(`round_to`) and the step compiles with `step_compiler_options`, so that at step 0 (policy = reference) both
forwards compute the same numbers in bf16 too and DPO's margin is not rounding noise times beta/2
(docs/objectives.md, "DPO at step 0 in bf16").
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mapo_jax import diffusion, sharding
from mapo_jax.diffusion import min_snr_weights  # noqa: F401  (re-exported: it lived here first)
from mapo_jax.models.attention import mesh_platform
from mapo_jax.training import lora
from mapo_jax.training import objectives

Params = Any
Batch = dict[str, jax.Array]
# Batch keys that are not conditioning: VAE posterior moments of winner and loser (a pair batch) or of one
# labelled sample (an unpaired batch: UNPAIRED_KEY and LABEL_KEY), RPO's embedding, SmPO's reward scores.
LATENT_KEYS = ("moments_w", "moments_l")
UNPAIRED_KEY = "moments"
LABEL_KEY = "label"  # +1 desirable, -1 undesirable (float32)
EMBEDDING_KEY = "rpo_emb"
SCORE_KEYS = ("score_w", "score_l")
NOT_CONDITIONING = LATENT_KEYS + (UNPAIRED_KEY, LABEL_KEY, EMBEDDING_KEY) + SCORE_KEYS
# The per-sample statistics' name suffix and the posterior-sample draw of each latent key.
_SUFFIX = {"moments_w": "_w", "moments_l": "_l", UNPAIRED_KEY: ""}
_EPS = {"moments_w": "eps_w", "moments_l": "eps_l", UNPAIRED_KEY: "eps_w"}
TIME_IDS_KEY = "time_ids"
TEXT_IDS_PREFIX = "ids_"  # a text tower's token ids: "ids_" + its model_index name (data/cache.py, the same prefix)
GUIDANCE_KEY = "guidance"  # conditioning: the embedded guidance scale of a guidance-distilled model (FLUX.1-dev)
TIME_KEYS = ("t", "sigma")  # the draws `diffusion.training_times` gives: the model's time, and flow matching's sigma
AUGMENT_STREAM = 1  # fold_in(step key, this): the augmentation's draws, apart from draw_noise's split
DROPOUT_STREAM = 2  # fold_in(step key, this): the LoRA adapters' dropout keys (config.lora.dropout)
EVAL_SEED = 0  # the held-out evaluation's one fixed key: the same noise and timesteps at every evaluation


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Params  # trainable UNet parameters (pure dict, float32 master copy): all, or the LoRA adapters
  opt_state: optax.OptState
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
  skipped: jax.Array  # updates skipped for a non-finite loss or gradient
  ema: Params | None = None  # exponential moving average of `params` (config.ema_decay >= 0), else None


@struct.dataclass
class Frozen:
  """Parameters that travel beside the train state and never train, placed on the mesh like it."""
  policy: Params  # the trained model's parameters outside the trainable filter ({} for a full fine-tune)
  reference: Params | None = None  # the frozen reference model (DPO, RPO), or None
  # The empty prompt's conditioning, one row per key without the batch axis ({"prompt_embeds": (77, D),
  # "pooled_prompt_embeds": (P,)}; for a token ids batch its ids, {"ids_text_encoder": (77,), ...}), swapped in for
  # captions at `StepConfig.empty_prompt_prob`; else None.
  empty_prompt: dict | None = None
  text: Params | None = None  # the frozen text towers' parameters (`TextEncoder`), for token ids batches; else None


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """The frozen text towers a step runs on a batch's token ids: their graphdef (the parameters travel in
  Frozen.text) and the family's `encode(towers, ids) -> conditioning` (`Pipeline.step_text`), ids keyed by tower
  name. The step knows no family: the family says what the towers give."""
  graphdef: Any
  encode: Callable


@dataclasses.dataclass(frozen=True)
class StepConfig:
  objective: str
  hparams: dict  # the objective's keyword options (`Objective.hparams`)
  latents: Any  # the family's `Latents` (normalisation of VAE latents)
  accum_steps: int = 1
  empty_prompt_prob: float = 0.0  # per pair: conditioning -> Frozen.empty_prompt (config.data.empty_prompt_prob)
  label_noise_prob: float = 0.0  # per pair: winner <-> loser (config.data.label_noise_prob)
  fixed_time_ids: tuple[float, ...] | None = None  # every pair's time ids, e.g. (R, R, 0, 0, R, R); None: the batch's
  # LoRA: the reference (DPO, RPO) is the policy with its adapters switched off, not Frozen.reference.
  adapters_off_reference: bool = False
  adapter_dropout: bool = False  # LoRA with config.lora.dropout > 0: adapters drop inputs in training steps
  min_snr_gamma: float = 0.0  # > 0: per-sample statistics weighted by min_snr_weights (config.min_snr_gamma; DDPM)
  # Flow matching: the sigma density and loss weighting (config.flow); ignored by a DDPM schedule.
  flow: diffusion.FlowTraining = diffusion.FlowTraining()
  # Put into every pair's conditioning as "guidance" unless the batch has its own (config.flow.guidance on a
  # flow-matching schedule; None: nothing). A family whose model takes no guidance ignores the key.
  guidance: float | None = None
  safeguard: str = ""  # "sdpo": the loser's gradient scaled by objectives.sdpo_loser_scale (config.objective_safeguard)
  safeguard_hparams: tuple[tuple[str, Any], ...] = ()  # its keyword options (config.sdpo), as items
  ema_decay: float | None = None  # ema <- decay * ema + (1 - decay) * params after each step; None: no EMA
  # A separate frozen reference (Frozen.reference) stored in this dtype (config.ref_param_dtype): the policy's
  # forward sees its parameters rounded to it (`round_to`), so that at policy = reference both forwards compute
  # on the same numbers (docs/objectives.md, "DPO at step 0 in bf16"). None: the policy's parameters as they are.
  reference_param_dtype: str | None = None


def init_state(params: Params, tx: optax.GradientTransformation, seed: int, ema: bool = False) -> TrainState:
  """The state at step 0; with `ema`, the EMA starts as a copy of `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.zeros((), jnp.int32),
                    ema=jax.tree.map(jnp.copy, params) if ema else None)


def update_ema(ema: Params, params: Params, decay: float) -> Params:
  """ema * decay + params * (1 - decay), leaf by leaf in the parameters' dtype (decay 0: params)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(p.dtype), ema, params)


def latent_key(batch: Batch) -> str:
  """The batch's first latent key: moments_w (pairs) or moments (unpaired samples)."""
  return UNPAIRED_KEY if UNPAIRED_KEY in batch else LATENT_KEYS[0]


def draw_noise(key: jax.Array, batch: Batch, schedule: diffusion.Schedule | int,
               flow: diffusion.FlowTraining | None = None) -> dict[str, jax.Array]:
  """Posterior samples for w and l, one noise and one training time per pair (shared by w and l): "t", the
  model's time, and for a flow-matching schedule "sigma" (`diffusion.training_times`, drawn with `flow`'s
  density; `schedule` may be a DDPM schedule's num_train_timesteps alone). For an unpaired batch the same draws
  serve its one sample per row (eps_w for its posterior sample)."""
  k_w, k_l, k_noise, k_t = jax.random.split(key, 4)
  moments = batch[latent_key(batch)]
  shape = moments.shape[:-1] + (moments.shape[-1] // 2,)
  return dict(eps_w=jax.random.normal(k_w, shape), eps_l=jax.random.normal(k_l, shape),
              noise=jax.random.normal(k_noise, shape), **diffusion.training_times(k_t, shape[0], schedule, flow))


def times_of(draws) -> dict[str, jax.Array]:
  """The training-time entries of `draws` ("t", and "sigma" for flow matching)."""
  return {k: draws[k] for k in TIME_KEYS if k in draws}


def prepare_batch(batch: Batch, cfg: StepConfig) -> Batch:
  """The deterministic part: `fixed_time_ids` replace the batch's (no re-encode needed); `guidance` becomes every
  pair's "guidance" conditioning unless the batch carries its own."""
  if cfg.guidance is not None and GUIDANCE_KEY not in batch:
    n = batch[latent_key(batch)].shape[0]
    batch = dict(batch, **{GUIDANCE_KEY: jnp.full((n,), cfg.guidance, jnp.float32)})
  if cfg.fixed_time_ids is None or TIME_IDS_KEY not in batch:
    return batch
  ids = batch[TIME_IDS_KEY]
  return dict(batch, **{TIME_IDS_KEY: jnp.broadcast_to(jnp.asarray(cfg.fixed_time_ids, ids.dtype), ids.shape)})


def augment_batch(key: jax.Array, batch: Batch, empty_prompt: dict | None, cfg: StepConfig):
  """Per pair, independently: with p = empty_prompt_prob every conditioning key of `empty_prompt`
  (prompt_embeds, pooled_prompt_embeds, or a token ids batch's ids; not time_ids) becomes the empty prompt's; with
  p = label_noise_prob moments_w and moments_l trade places. Returns (batch, {"empty_prompt_fraction",
  "label_flip_fraction"}).

  `rpo_emb` is not swapped: it says which pairs RPO compares (their captions' similarity), and a pair
  whose conditioning was dropped still shows what its caption describes.
  `key` is the step's key; the draws are made for the whole global batch, from their own stream.
  """
  n = batch[latent_key(batch)].shape[0]
  k_empty, k_flip = jax.random.split(jax.random.fold_in(key, AUGMENT_STREAM))
  out, stats = dict(batch), {}
  per_pair = lambda mask, x: mask.reshape((n,) + (1,) * (x.ndim - 1))
  if cfg.empty_prompt_prob > 0:
    if not empty_prompt:
      raise ValueError("empty_prompt_prob > 0 needs Frozen.empty_prompt, the empty prompt's conditioning")
    drop = jax.random.bernoulli(k_empty, cfg.empty_prompt_prob, (n,))
    for k, row in empty_prompt.items():
      out[k] = jnp.where(per_pair(drop, batch[k]), jnp.asarray(row, batch[k].dtype)[None], batch[k])
    stats["empty_prompt_fraction"] = jnp.mean(drop.astype(jnp.float32))
  if cfg.label_noise_prob > 0:
    flip = jax.random.bernoulli(k_flip, cfg.label_noise_prob, (n,))
    w, l = batch[LATENT_KEYS[0]], batch[LATENT_KEYS[1]]
    out[LATENT_KEYS[0]] = jnp.where(per_pair(flip, w), l, w)
    out[LATENT_KEYS[1]] = jnp.where(per_pair(flip, w), w, l)
    stats["label_flip_fraction"] = jnp.mean(flip.astype(jnp.float32))
  return out, stats


def encode_text(text: TextEncoder | None, params: Params | None, batch: Batch) -> Batch:
  """A token ids batch (keys TEXT_IDS_PREFIX + tower name) with its ids replaced by the towers' conditioning
  (float32, no gradient: the towers are frozen); any other batch as it is."""
  ids = {k[len(TEXT_IDS_PREFIX):]: v for k, v in batch.items() if k.startswith(TEXT_IDS_PREFIX)}
  if not ids:
    return batch
  if text is None or params is None:
    raise ValueError(f"the batch holds token ids {sorted(ids)} but the step has no text towers (build's `text`)")
  cond = text.encode(nnx.merge(text.graphdef, params), ids)
  out = {k: v for k, v in batch.items() if not k.startswith(TEXT_IDS_PREFIX)}
  return out | {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in cond.items()}


def posterior_sample(moments: jax.Array, eps: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2) eps, the raw VAE latent; moments = [mean, logvar] on the channel axis."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps


def branches(batch: Batch, objective: objectives.Objective) -> tuple[str, ...]:
  """The latent keys the denoiser sees, stacked in this order: an unpaired batch's samples; a pair batch's
  winners and losers (paired objectives, and unpaired ones fed each pair as two samples); else winners."""
  if UNPAIRED_KEY in batch:
    return (UNPAIRED_KEY,)
  return LATENT_KEYS if objective.paired or objective.unpaired else LATENT_KEYS[:1]


def training_latents(batch: Batch, draws, latents, keys) -> jax.Array:
  """The normalised latents the denoiser trains on, the `keys` stacked ([winners; losers] for a pair)."""
  return latents.normalize(jnp.concatenate([posterior_sample(batch[k], draws[_EPS[k]]) for k in keys]))


def predictions(denoise: Callable, model, batch: Batch, draws, schedule, latents, keys):
  """(prediction, target), float32, for the `keys` stacked; every branch shares the noise and training time. The
  model sees the schedule's noisy latents at its model time draws["t"] (flow matching: sigma * T)."""
  z = training_latents(batch, draws, latents, keys)
  stack = lambda x: jnp.concatenate([x] * len(keys))
  noise, times = stack(draws["noise"]), {k: stack(v) for k, v in times_of(draws).items()}
  cond = {k: stack(v) for k, v in batch.items() if k not in NOT_CONDITIONING}
  pred = denoise(model, diffusion.noisy_latents(schedule, z, noise, times), times["t"], cond)
  return pred.astype(jnp.float32), diffusion.regression_target(schedule, z, noise, times)


def per_sample_statistics(pred, target, ref_pred, keys, weights=None) -> dict[str, jax.Array]:
  """Per sample, means over (H, W, C), for each branch k (suffix _w, _l, or none for unpaired samples):
  err_k = (pred - target)^2; with the reference's prediction also ref_err_k = (ref_pred - target)^2,
  dev_k = (pred - ref_pred)^2 and res_dev_k = (pred - target)(pred - ref_pred); for a pair,
  res_wl = (pred_w - target_w)(pred_l - target_l). `weights` (per pair: `diffusion.loss_weights`) multiply every
  one, as diffusers' scripts weigh their per-sample squared errors (a per-sample factor of the mean)."""
  mean = lambda x: jnp.mean(x, axis=tuple(range(1, x.ndim)))
  out = {}

  def add(name, per_sample):  # reduced over the whole stack, then split by branch
    out.update({name + _SUFFIX[k]: v for k, v in zip(keys, jnp.split(per_sample, len(keys)))})

  res = pred - target
  add("err", mean(jnp.square(res)))
  if ref_pred is not None:
    dev = pred - ref_pred
    add("ref_err", mean(jnp.square(ref_pred - target)))
    add("dev", mean(jnp.square(dev)))
    add("res_dev", mean(res * dev))
  if len(keys) == 2:
    res_w, res_l = jnp.split(res, 2)
    out["res_wl"] = mean(res_w * res_l)
  if weights is not None:
    out = {k: v * weights for k, v in out.items()}
  return out


def per_sample_errors(denoise: Callable, model, batch: Batch, draws, schedule, latents, pair: bool):
  """mean over (H, W, C) of (prediction − target)² in float32, for [winners; losers] (or winners only)."""
  keys = LATENT_KEYS if pair else LATENT_KEYS[:1]
  stats = per_sample_statistics(*predictions(denoise, model, batch, draws, schedule, latents, keys), None, keys)
  return stats["err_w"], stats.get("err_l")


def pairs_as_unpaired(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """A pair batch's statistics as 2B unpaired samples: every winner desirable (+1), every loser not (-1)."""
  out = {name: jnp.concatenate([stats[name + "_w"], stats[name + "_l"]])
         for name in ("err", "ref_err", "dev", "res_dev") if name + "_w" in stats}
  n = stats["err_w"].shape[0]
  out["label"] = jnp.concatenate([jnp.ones((n,), jnp.float32), -jnp.ones((n,), jnp.float32)])
  return out


def round_to(params: Params, dtype) -> Params:
  """Every floating leaf's value rounded to `dtype` (as casting it there would), kept in the leaf's own dtype,
  with the identity as its gradient (straight-through): the forward computes on the numbers a copy stored in
  `dtype` holds, while the gradient and the update stay in full precision. Leaves no wider than `dtype` are
  returned as they are. With excess precision allowed XLA may drop such a round trip; the steps that round
  compile with it off (`step_compiler_options`)."""
  dtype = jnp.dtype(dtype)

  def one(p):
    if not jnp.issubdtype(p.dtype, jnp.floating) or jnp.finfo(p.dtype).bits <= jnp.finfo(dtype).bits:
      return p
    return p + jax.lax.stop_gradient(p.astype(dtype).astype(p.dtype) - p)  # exactly the rounded value

  return jax.tree.map(one, params)


def make_loss_fn(denoise: Callable, graphdef, ref_graphdef, schedule, cfg: StepConfig):
  """`loss_fn(params, frozen, batch, draws) -> (loss, metrics)` for one (micro-)batch."""
  objective = objectives.get_objective(cfg.objective)

  def reference(params, frozen: Frozen):
    if cfg.adapters_off_reference:  # B = 0 makes every adapter's s·(x A) B exactly 0: the frozen base itself
      return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), frozen.policy)
    return nnx.merge(ref_graphdef, frozen.reference)

  def loss_fn(params, frozen: Frozen, batch, draws):
    keys = branches(batch, objective)
    run = lambda model: predictions(denoise, model, batch, draws, schedule, cfg.latents, keys)
    forward_params = params
    if cfg.reference_param_dtype and objective.needs_reference and not cfg.adapters_off_reference:
      forward_params = round_to(params, cfg.reference_param_dtype)
    policy = nnx.merge(graphdef, forward_params, frozen.policy)
    if "adapter_dropout" in draws:  # training steps only: one key per micro-batch (its first pair's)
      lora.set_dropout_keys(policy, draws["adapter_dropout"][0])
    pred, target = run(policy)
    ref_pred = None
    if objective.needs_reference:
      ref_pred = jax.lax.stop_gradient(run(reference(params, frozen))[0])
    weights = diffusion.loss_weights(schedule, times_of(draws), min_snr_gamma=cfg.min_snr_gamma, flow=cfg.flow)
    stats = per_sample_statistics(pred, target, ref_pred, keys, weights)
    extra = {}
    if cfg.safeguard == "sdpo":
      scale = objectives.sdpo_loser_scale(stats["err_w"], stats["res_wl"], **dict(cfg.safeguard_hparams))
      stats["err_l"] = objectives.scale_gradient(stats["err_l"], scale)
      extra["loser_scale"] = scale
    elif cfg.safeguard:
      raise ValueError(f"objective_safeguard={cfg.safeguard!r}; expected one of {sorted(objectives.SAFEGUARDS)}")
    if objective.unpaired:
      stats = dict(stats, label=batch[LABEL_KEY]) if UNPAIRED_KEY in batch else pairs_as_unpaired(stats)
    inputs = dict(stats, emb=batch.get(EMBEDDING_KEY), **{k: batch.get(k) for k in SCORE_KEYS})
    loss, metrics = objectives.call_objective(cfg.objective, inputs, cfg.hparams)
    return loss, dict(metrics, **extra)

  return loss_fn


def in_mesh(mesh):
  """The step's body traced under `mesh` (its abstract form), so per-shard kernels (models/attention.py) see
  it however the step is jitted, as under `build.compile_step`'s `jax.set_mesh`; no mesh: as is."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def make_train_step(denoise: Callable, graphdef, ref_graphdef, tx, schedule, cfg: StepConfig, mesh=None,
                    opt_shardings=None, text: TextEncoder | None = None):
  """Returns `step(state, batch, frozen) -> (state, metrics)`; jit it with the state donated. `text`: the text
  towers that encode a token ids batch (parameters in frozen.text).

  With `mesh`, each micro-batch is pinned to the (data, fsdp) batch sharding: XLA cannot infer it
  through the micro-batch reshape and would otherwise replicate and re-partition activations.
  `opt_shardings`: the optimizer state's shardings when it lives in host memory (`create_sharded_state`
  with `offload_optimizer`): the update brings it to the devices and puts the new state back.
  """
  loss_fn = make_loss_fn(denoise, graphdef, ref_graphdef, schedule, cfg)
  pin = ((lambda t: jax.lax.with_sharding_constraint(t, sharding.batch_sharding(mesh))) if mesh is not None
         else (lambda t: t))
  move = lambda tree, kind: jax.tree.map(lambda x, s: jax.device_put(x, s.with_memory_kind(kind)), tree, opt_shardings)

  def step(state: TrainState, batch: Batch, frozen: Frozen):
    with in_mesh(mesh):
      return _step(state, batch, frozen)

  def _step(state: TrainState, batch: Batch, frozen: Frozen):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch, augmented = augment_batch(key, prepare_batch(batch, cfg), frozen.empty_prompt, cfg)
    batch = encode_text(text, frozen.text, batch)
    draws = draw_noise(key, batch, schedule, cfg.flow)
    if cfg.adapter_dropout:
      n = batch[latent_key(batch)].shape[0]
      draws["adapter_dropout"] = jax.random.key_data(jax.random.split(jax.random.fold_in(key, DROPOUT_STREAM), n))
    # Micro-batch j takes pairs j, j+k, j+2k, ...: each device's shard of the batch splits in place.
    micro = lambda x: x.reshape(-1, cfg.accum_steps, *x.shape[1:]).swapaxes(0, 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
      (_, metrics), grads = grad_fn(state.params, frozen, *pin(xs))
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(state.params, frozen, *jax.tree.map(lambda x: micro(x)[0], (batch, draws)))))
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero[1], zero[0][1]),
                                       jax.tree.map(micro, (batch, draws)))
    grads, metrics = jax.tree.map(lambda x: x / cfg.accum_steps, (grads, metrics))

    # A NaN/inf anywhere in the gradient makes its global norm non-finite. lax.cond (not a per-leaf
    # select) keeps XLA from fusing the whole backward pass into the update: 4x faster to compile.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def update(_):
      opt_state = state.opt_state if opt_shardings is None else move(state.opt_state, "device")
      updates, opt_state = tx.update(grads, opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state if opt_shardings is None else move(opt_state,
                                                                                                     "pinned_host")

    params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    ema = state.ema if state.ema is None else update_ema(state.ema, params, cfg.ema_decay)
    metrics = dict(metrics, **augmented, grad_norm=grad_norm, skipped_steps=skipped)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped, ema=ema), metrics

  return step


def make_eval_step(denoise: Callable, graphdef, ref_graphdef, schedule, cfg: StepConfig, mesh=None,
                   text: TextEncoder | None = None):
  """Returns `evaluate(params, batch, frozen, micro_pairs) -> metrics`: the objective's loss and metrics on
  held-out pairs with one fixed key (EVAL_SEED), so every evaluation draws the same noise and timesteps and
  the curve moves only with the parameters. No empty prompts or label noise; `fixed_time_ids` apply. The
  batch is split into micro-batches of `micro_pairs` as the train step splits its batch (pairs j, j+k, ...)
  and their metrics averaged (equal sizes: for the per-pair objectives, the mean over all held-out pairs).
  """
  loss_fn = make_loss_fn(denoise, graphdef, ref_graphdef, schedule, cfg)
  pin = ((lambda t: jax.lax.with_sharding_constraint(t, sharding.batch_sharding(mesh))) if mesh is not None
         else (lambda t: t))

  def evaluate(params, batch: Batch, frozen: Frozen, micro_pairs: int):
    with in_mesh(mesh):
      return _evaluate(params, batch, frozen, micro_pairs)

  def _evaluate(params, batch: Batch, frozen: Frozen, micro_pairs: int):
    batch = encode_text(text, frozen.text, prepare_batch(batch, cfg))
    draws = draw_noise(jax.random.key(EVAL_SEED), batch, schedule, cfg.flow)
    micro = lambda x: x.reshape(micro_pairs, -1, *x.shape[1:]).swapaxes(0, 1)
    metrics = jax.lax.map(lambda xs: loss_fn(params, frozen, *pin(xs))[1], jax.tree.map(micro, (batch, draws)))
    return jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  return evaluate


def create_sharded_state(model: nnx.Module, tx, mesh, seed: int, trainable=nnx.Param, ema: bool = False,
                         offload_optimizer: bool = False):
  """Splits `model` by the `trainable` filter and places both parts on `mesh` by the logical-axis rules:
  the trainable parameters with the optimizer state (created already sharded: jit with out_shardings) as
  the TrainState, every other parameter as the frozen part of the policy.

  Returns (graphdef, state, state_shardings, frozen_params, frozen_shardings); `nnx.merge(graphdef,
  state.params, frozen_params)` is the model again.
  An abstract model (nnx.eval_shape) gives the same results as ShapeDtypeStructs with their shardings,
  for ahead-of-time compiles. The model's own trainable arrays are donated to the state. With
  `offload_optimizer` the optimizer state lives in host memory (memory kind "pinned_host", as MaxText's
  optimizer offload keeps it); the step brings it to the devices for the update (`make_train_step`).
  """
  graphdef, _, _ = nnx.split(model, trainable, ...)
  params, param_sh = sharding.place(model, mesh, trainable)
  frozen, frozen_sh = sharding.place(model, mesh, nnx.Not(trainable))
  init = lambda p: init_state(p, tx, seed, ema)
  abstract = jax.eval_shape(init, params)
  state_sh = _state_shardings(abstract, param_sh, mesh)
  if offload_optimizer:
    state_sh = state_sh.replace(opt_state=jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), state_sh.opt_state))
  if sharding.is_abstract(params):
    return graphdef, sharding.with_shardings(abstract, state_sh), state_sh, frozen, frozen_sh
  # Donated: otherwise the state's params are a second full float32 copy beside the loaded ones.
  state = jax.jit(init, out_shardings=state_sh, donate_argnums=0)(params)
  return graphdef, state, state_sh, frozen, frozen_sh


def _state_shardings(abstract: TrainState, param_sh, mesh):
  """The state's shardings: params by the rules; optimizer state by `optimizer_leaf_sharding`, leaf by leaf
  against the parameter it belongs to (subtrees with the params' structure); the rest replicated."""
  rep = sharding.replicated(mesh)
  param_struct = jax.tree.structure(abstract.params)
  is_params_like = lambda x: jax.tree.structure(x) == param_struct

  def subtree(x):
    if is_params_like(x):
      return jax.tree.map(optimizer_leaf_sharding, x, abstract.params, param_sh)
    return jax.tree.map(lambda _: rep, x)

  opt_sh = jax.tree.map(subtree, abstract.opt_state, is_leaf=is_params_like)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, skipped=rep,
                    ema=None if abstract.ema is None else param_sh)


def optimizer_leaf_sharding(leaf, param, param_sharding):
  """The sharding of one optimizer-state leaf that belongs to `param`, from the leaf's own shape: shaped like
  the parameter, the parameter's (Adam's moments); shaped like it with one axis removed, the parameter's spec
  without that axis (Adafactor's factored row / column moments); anything else (optax's shape-(1,)
  placeholders for moments it does not factor, counts) replicated. Serves any optax transformation."""
  mesh, spec = param_sharding.mesh, tuple(param_sharding.spec) + (None,) * (len(param.shape) - len(param_sharding.spec))
  if tuple(leaf.shape) == tuple(param.shape):
    return param_sharding
  if len(leaf.shape) == len(param.shape) - 1:
    for axis in range(len(param.shape)):
      if tuple(leaf.shape) == tuple(param.shape[:axis] + param.shape[axis + 1:]):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(spec[:axis] + spec[axis + 1:])))
  return sharding.replicated(mesh)


def step_compiler_options(cfg: StepConfig, mesh) -> dict[str, Any]:
  """XLA options for a step whose objective compares the policy with a reference model, so that at policy =
  reference the two forwards round alike (docs/objectives.md, "DPO at step 0 in bf16"). The policy's forward sits in
  the differentiated program and fuses differently from the reference's forward-only one, and XLA's numerics
  may follow the fusion: with excess precision allowed (the default) a fusion may keep a bf16 intermediate in
  float32, and XLA:CPU hands some reductions of some fusions to YNNPACK, which sums in another order. Both
  are switched off (the latter is an XLA:CPU option, set for CPU targets only). Other steps: none."""
  if not objectives.get_objective(cfg.objective).needs_reference:
    return {}
  options = {"xla_allow_excess_precision": False}
  if (mesh_platform(mesh) if mesh is not None else jax.default_backend()) == "cpu":
    options["xla_cpu_experimental_ynn_fusion_type"] = ""
  return options


def jit_train_step(step_fn, state_shardings, mesh, frozen_shardings: Frozen, compiler_options=None):
  """jit with the state donated, batch sharded over (data, fsdp) and metrics replicated; `compiler_options`:
  XLA's (`step_compiler_options`)."""
  return jax.jit(step_fn, donate_argnums=(0,),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), frozen_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), compiler_options=compiler_options)


def jit_eval_step(eval_fn, param_shardings, mesh, frozen_shardings: Frozen, micro_pairs: int, compiler_options=None):
  """`evaluate(params, batch, frozen)` jitted with the train step's shardings (nothing donated), one
  micro-batch of `micro_pairs` pairs at a time."""
  return jax.jit(lambda params, batch, frozen: eval_fn(params, batch, frozen, micro_pairs),
                 in_shardings=(param_shardings, sharding.batch_sharding(mesh), frozen_shardings),
                 out_shardings=sharding.replicated(mesh), compiler_options=compiler_options)
