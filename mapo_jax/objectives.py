"""Preference objectives as pure functions of per-sample denoising errors.

Every objective takes per-sample errors `l_k = mean_{H,W,C} (pred_k - target_k)^2` of shape (B,), one
entry per preference pair (winner `w`, loser `l`, same noise and timestep), and returns `(loss, metrics)`:
a float32 scalar and a flat dict of float32 scalars. Inputs of any float dtype are upcast to float32 first.
All functions are jittable and hold no state; reference errors must already be under `stop_gradient`.

Reductions are plain means over the B pairs. Under `jax.jit` with batch-sharded inputs, these jnp reductions
already span the global batch (XLA inserts the cross-device collectives), so pass the global arrays, not
per-device shards. Formulas, sources and defaults: docs/objectives.md.

Each objective is registered in `OBJECTIVES` with the inputs it takes (so what it needs: a reference
model's errors, a per-pair embedding, losers at all) and its hyper-parameters with their defaults: the
config's block of the same name, the trainer, the benchmarks and the tests all read them from there.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def _mean(x):
  return jnp.mean(x.astype(jnp.float32))


def mapo_score(err, snr=0.5):
  """MaPO's per-sample score g(l) = s*l / (exp(s*l) - 1), float32, with g(0) = 1 and finite gradients.

  With x = s*l, x/expm1(x) is rewritten as |x| * exp(-max(x, 0)) / (1 - exp(-|x|)), which equals it for every
  x != 0 and cannot overflow for large |x| (plain exp(x) overflows float32 at x > 88, and its gradient
  turns into inf/inf = NaN much earlier). Near 0 the series 1 - x/2 + x^2/12 (error < x^4/720) is used, and
  the exact branch sees a dummy input there so its 0/0 never reaches the gradient.
  """
  x = snr * jnp.asarray(err, jnp.float32)
  small = jnp.abs(x) < 1e-2
  xs = jnp.where(small, 1.0, x)
  exact = jnp.abs(xs) * jnp.exp(-jnp.maximum(xs, 0.0)) / -jnp.expm1(-jnp.abs(xs))
  series = 1.0 - x / 2.0 + x * x / 12.0
  return jnp.where(small, series, exact)


def mapo_loss(err_w, err_l, *, beta=0.1, snr=0.5, num_timesteps=1000) -> tuple[jax.Array, Metrics]:
  """MaPO, margin-aware preference optimisation (Hong et al., arXiv 2406.06424), reference-free.

      g(l) = s*l / (exp(s*l) - 1)                                     s = snr
      loss = mean_i l_w,i - beta * mean_i log_sigmoid(T * (g(l_w,i) - g(l_l,i)))      T = num_timesteps

  The first term is the SFT (winner MSE) term with weight 1; the second is the odds-ratio term, as the
  official trainer (`mapo-t2i/mapo`, utils.py `compute_loss`) computes it.
  Metrics: the official logs (loss, win_score, lose_score, or_loss, mse_w, mse_l) plus
  margin = mean(g_w - g_l) and accuracy = mean(g_w > g_l).
  """
  err_w, err_l = _f32(err_w, err_l)
  g_w, g_l = mapo_score(err_w, snr), mapo_score(err_l, snr)
  or_loss = -beta * jnp.mean(jax.nn.log_sigmoid(num_timesteps * (g_w - g_l)))
  sft = jnp.mean(err_w)
  loss = sft + or_loss
  metrics = {
      "loss": loss,
      "win_score": jnp.mean(g_w),
      "lose_score": jnp.mean(g_l),
      "or_loss": or_loss,
      "mse_w": sft,
      "mse_l": jnp.mean(err_l),
      "margin": jnp.mean(g_w - g_l),
      "accuracy": _mean(g_w > g_l),
  }
  return loss, metrics


def _reference_metrics(err_w, err_l, ref_err_w, ref_err_l) -> Metrics:
  # Official Diffusion-DPO logs: raw model / reference MSE over both halves of the batch.
  return {
      "mse_w": jnp.mean(err_w),
      "mse_l": jnp.mean(err_l),
      "ref_mse_w": jnp.mean(ref_err_w),
      "ref_mse_l": jnp.mean(ref_err_l),
      "model_mse": 0.5 * (jnp.mean(err_w) + jnp.mean(err_l)),
      "ref_mse": 0.5 * (jnp.mean(ref_err_w) + jnp.mean(ref_err_l)),
  }


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta=5000.0) -> tuple[jax.Array, Metrics]:
  """Diffusion-DPO (Wallace et al., arXiv 2311.12908, eq. 14) with a frozen reference model.

      inside_i = -0.5 * beta * ((l_w,i - l_l,i) - (ref_w,i - ref_l,i))
      loss     = mean_i -log_sigmoid(inside_i)

  Equals log 2 when policy == reference. As in the official trainer (SalesforceAIResearch/DiffusionDPO
  train.py), implicit_acc = mean(inside > 0), ties count as wrong; `accuracy` is the same number and
  `margin` = mean(inside), the sigmoid's logit.
  """
  err_w, err_l, ref_err_w, ref_err_l = _f32(err_w, err_l, ref_err_w, ref_err_l)
  inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
  loss = -jnp.mean(jax.nn.log_sigmoid(inside))
  acc = _mean(inside > 0)
  metrics = {"loss": loss, "implicit_acc": acc, "accuracy": acc, "margin": jnp.mean(inside)}
  metrics.update(_reference_metrics(err_w, err_l, ref_err_w, ref_err_l))
  return loss, metrics


def rpo_weights(emb, tau=0.5):
  """W_ij = softmax_j(-(1 - cos(e_i, e_j)) / tau) for emb (B, E); each row sums to 1.

  Embeddings are L2-normalised as torch.nn.functional.normalize does (norm floored at 1e-12).
  """
  e = jnp.asarray(emb, jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  cos = e @ e.T
  return jax.nn.softmax(-(1.0 - cos) / tau, axis=-1)


def rpo_loss(err_w, err_l, ref_err_w, ref_err_l, emb, *, beta=5000.0, tau=0.5) -> tuple[jax.Array, Metrics]:
  """Diffusion-RPO, relative preference optimisation across pairs (Gu et al., arXiv 2406.06382).

  Diffusion-RPO published no diffusion code: this is our own construction (docs/objectives.md), carrying the
  LLM RPO trainer's loss (yinyueqin/relative-preference-optimization, `RPOTrainer.loss`) over to per-sample
  denoising errors in the way Diffusion-DPO carries DPO over:

      u_w,i = -(l_w,i - ref_w,i)          u_l,j = -(l_l,j - ref_l,j)
      W_ij  = softmax_j(-(1 - cos(e_i, e_j)) / tau)            e_i: embedding of pair i (emb row i)
      z_ij  = (beta / 2) * W_ij * (u_w,i - u_l,j)
      loss  = mean_i mean_j -log_sigmoid(z_ij)

  The weight sits inside the sigmoid. The diagonal z_ii, unweighted, is Diffusion-DPO's `inside_i`. The B x B
  matrix spans the pairs passed in: under jit with batch-sharded global arrays that is every device's pairs;
  the train step passes one micro-batch at a time, so with gradient accumulation it spans one micro-batch.
  Metrics: loss, accuracy / implicit_acc and margin on the diagonal (as dpo_loss), weight_diag = mean W_ii,
  and the model / reference MSEs.
  """
  err_w, err_l, ref_err_w, ref_err_l = _f32(err_w, err_l, ref_err_w, ref_err_l)
  u_w, u_l = -(err_w - ref_err_w), -(err_l - ref_err_l)
  w = rpo_weights(emb, tau)
  z = 0.5 * beta * w * (u_w[:, None] - u_l[None, :])
  loss = -jnp.mean(jax.nn.log_sigmoid(z))
  diag = 0.5 * beta * (u_w - u_l)
  acc = _mean(diag > 0)
  metrics = {
      "loss": loss,
      "implicit_acc": acc,
      "accuracy": acc,
      "margin": jnp.mean(diag),
      "weight_diag": jnp.mean(jnp.diagonal(w)),
  }
  metrics.update(_reference_metrics(err_w, err_l, ref_err_w, ref_err_l))
  return loss, metrics


def sft_loss(err_w) -> tuple[jax.Array, Metrics]:
  """Supervised fine-tuning baseline: loss = mean_i l_w,i, the denoising MSE on winner latents only.

  Every sample has the same number of elements, so the mean of per-sample means is the mean over all
  elements. There is no loser term, hence no margin or accuracy.
  """
  (err_w,) = _f32(err_w)
  loss = jnp.mean(err_w)
  return loss, {"loss": loss, "mse_w": loss}


# The embeddings e_i RPO can compare pairs by: the pooled prompt embedding, or the prompt embeddings
# averaged over tokens (computed when the pairs are encoded).
RPO_EMBEDDINGS = ("pooled", "mean_tokens")


class Objective(NamedTuple):
  fn: Callable[..., tuple[jax.Array, Metrics]]
  inputs: tuple[str, ...]  # names of fn's positional arguments, in order
  defaults: dict[str, Any]  # hyper-parameters (config block `config.<name>`) and their defaults

  @property
  def needs_reference(self) -> bool:
    return "ref_err_w" in self.inputs

  @property
  def needs_embedding(self) -> bool:
    return "emb" in self.inputs

  @property
  def paired(self) -> bool:
    """Whether it takes the losers' errors (else only winners are denoised)."""
    return "err_l" in self.inputs

  def hparams(self, values: Any = None, *, num_timesteps: int) -> dict[str, Any]:
    """fn's keyword options: `values` (a mapping, e.g. the config block; default: `defaults`), plus the
    noise schedule's length where fn takes `num_timesteps` (MaPO's T)."""
    out = dict(self.defaults if values is None else values)
    if "num_timesteps" in inspect.signature(self.fn).parameters:
      out["num_timesteps"] = num_timesteps
    return out


_PAIR = ("err_w", "err_l")
_REF = _PAIR + ("ref_err_w", "ref_err_l")
OBJECTIVES: dict[str, Objective] = {
    "mapo": Objective(mapo_loss, _PAIR, dict(beta=0.1, snr=0.5)),  # official MaPO: beta 0.1, snr_value 0.5
    "dpo": Objective(dpo_loss, _REF, dict(beta=5000.0)),  # official Diffusion-DPO beta_dpo
    "rpo": Objective(rpo_loss, _REF + ("emb",), dict(beta=5000.0, tau=0.5)),
    "sft": Objective(sft_loss, ("err_w",), {}),
}
def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"objective={name!r}; expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def needs_reference(name: str) -> bool:
  """Whether objective `name` needs the frozen reference model's errors."""
  return get_objective(name).needs_reference


def objective_loss(name, err_w, err_l=None, *, ref_err_w=None, ref_err_l=None, emb=None, **hparams):
  """Calls objective `name` with the inputs it takes; `hparams` are its keyword options (beta, tau, ...).

  Lets a train step call every objective the same way; inputs the objective does not take are ignored.
  """
  obj = get_objective(name)
  given = dict(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l, emb=emb)
  missing = [k for k in obj.inputs if given[k] is None]
  if missing:
    raise ValueError(f"objective {name!r} needs {missing}")
  return obj.fn(*(given[k] for k in obj.inputs), **hparams)
