"""Preference objectives as pure functions of per-sample denoising errors.

Every objective takes per-sample errors `l_k = mean_{H,W,C} (pred_k - target_k)^2` of shape (B,), one
entry per preference pair (winner `w`, loser `l`, same noise and timestep) or, for KTO, per labelled
unpaired sample, plus what else it names (the `REFERENCE_INPUTS` statistics, embeddings, reward scores,
labels), and returns `(loss, metrics)`:
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


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta):
  """Diffusion-DPO's logit: inside_i = -beta/2 * ((l_w,i - l_l,i) - (r_w,i - r_l,i))."""
  return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta=5000.0, loss_type="sigmoid") -> tuple[jax.Array, Metrics]:
  """Diffusion-DPO (Wallace et al., arXiv 2311.12908, eq. 14) with a frozen reference model.

      inside_i = -0.5 * beta * ((l_w,i - l_l,i) - (r_w,i - r_l,i))  =  (beta / 2) * logit_i
      logit_i  = (r_w,i - r_l,i) - (l_w,i - l_l,i)
      sigmoid: loss = mean_i -log_sigmoid(inside_i)                 (official DiffusionDPO train.py)
      hinge:   loss = mean_i relu(1 - inside_i)
      ipo:     loss = mean_i (logit_i - 1 / beta)^2

  `loss_type` follows diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, whose
  `beta_dpo` multiplies `logit = ref_diff - model_diff` without the 1/2: its beta_dpo is our beta / 2, so
  hinge relu(1 - beta_dpo * logit) and ipo (logit - 1 / (2 beta_dpo))^2 are the lines above. (That
  script's ipo line reads `args.beta`, an argument it does not define; we take beta_dpo as meant.)
  Equals log 2 (sigmoid), 1 (hinge) or 1/beta^2 (ipo) when policy == reference. As in the official trainer
  (SalesforceAIResearch/DiffusionDPO train.py), implicit_acc = mean(inside > 0), ties count as wrong;
  `accuracy` is the same number and `margin` = mean(inside).
  """
  err_w, err_l, ref_err_w, ref_err_l = _f32(err_w, err_l, ref_err_w, ref_err_l)
  inside = _dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta)
  if loss_type == "sigmoid":
    per_pair = -jax.nn.log_sigmoid(inside)
  elif loss_type == "hinge":
    per_pair = jax.nn.relu(1.0 - inside)
  elif loss_type == "ipo":
    logit = (ref_err_w - ref_err_l) - (err_w - err_l)
    per_pair = jnp.square(logit - 1.0 / beta)
  else:
    raise ValueError(f"dpo loss_type={loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  loss = jnp.mean(per_pair)
  return loss, _dpo_metrics(loss, inside, err_w, err_l, ref_err_w, ref_err_l)


def _dpo_metrics(loss, inside, err_w, err_l, ref_err_w, ref_err_l) -> Metrics:
  acc = _mean(inside > 0)
  metrics = {"loss": loss, "implicit_acc": acc, "accuracy": acc, "margin": jnp.mean(inside)}
  metrics.update(_reference_metrics(err_w, err_l, ref_err_w, ref_err_l))
  return metrics


def dmpo_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta=2000.0, alpha=0.01) -> tuple[jax.Array, Metrics]:
  """DMPO: the Diffusion-DPO logit u = inside_i (dpo_loss) pulled toward a target probability 1 - alpha,

      p_i  = sigmoid(u_i)        q = clip(1 - alpha, 1e-6, 1 - 1e-6)
      loss = mean_i KL(Bern(p_i) || Bern(q)) = mean_i p log(p/q) + (1 - p) log((1 - p)/(1 - q))

  with log p = log_sigmoid(u) and log(1 - p) = log_sigmoid(-u). As AIDC-AI/Diffusion-SDPO train.py computes
  it (`train_method == 'dmpo'`, the clip included); defaults from its scripts/train/sd15_dmpo.sh
  (beta_dpo 2000, dmpo_alpha 0.01). The minimum (0) is at p = q.
  """
  err_w, err_l, ref_err_w, ref_err_l = _f32(err_w, err_l, ref_err_w, ref_err_l)
  u = _dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta)
  # 1 - q = clip(alpha, 1e-6, 1 - 1e-6) exactly; taken from alpha, as 1 - (1 - alpha) in float32 loses
  # alpha's digits when alpha is small.
  one_minus_q = jnp.clip(jnp.float32(alpha), 1e-6, 1.0 - 1e-6)
  p = jax.nn.sigmoid(u)
  kl = (p * (jax.nn.log_sigmoid(u) - jnp.log1p(-one_minus_q))
        + (1.0 - p) * (jax.nn.log_sigmoid(-u) - jnp.log(one_minus_q)))
  loss = jnp.mean(kl)
  return loss, _dpo_metrics(loss, u, err_w, err_l, ref_err_w, ref_err_l)


DSPO_FORMS = ("sd15", "sdxl")


def dspo_loss(err_w, err_l, ref_err_w, ref_err_l, dev_w, res_dev_w, *, form="sd15", beta_sd15=0.001,
              beta_sdxl=5000.0) -> tuple[jax.Array, Metrics]:
  """DSPO, direct score preference optimisation (Zhu et al., ICLR 2025), as its code computes it
  (huaishengzhu/DSPO train.py, `train_method == 'dspo'`; the same lines in AIDC-AI/Diffusion-SDPO train.py).

  With r_w = pred_w - target_w (winner residual), d_w = pred_w - ref_pred_w (policy minus reference
  prediction) and c_i = 1 - sigmoid(inside_i) (inside_i: dpo_loss's logit with this form's beta, gradient
  flowing through it):

      sd15:  loss = mean_i mean_HWC (r_w - beta c_i d_w)^2
                  = mean_i [l_w,i - 2 beta c_i res_dev_w,i + beta^2 c_i^2 dev_w,i]
      sdxl:  loss = mean_i c_i^2 dev_w,i   if mean_i dev_w,i >= 0.1,   else mean_i c_i^2

  where dev_w,i = mean_HWC d_w^2 and res_dev_w,i = mean_HWC r_w d_w (the train step computes both from
  the predictions; the expansion is exact algebra). Only the winners' outputs enter the squared term;
  the losers enter through c. The sdxl branch (its batch-mean switch included) is the code's; its threshold is
  a batch statistic, so with gradient accumulation it is taken per micro-batch.

  beta defaults per form, as both repositories' launchers set `--beta_dpo`: 0.001 for sd15 (DSPO
  launchers/sd15.sh, Diffusion-SDPO scripts/train/sd15_dspo.sh), 5000 for sdxl (launchers/sdxl.sh,
  scripts/train/sdxl_dspo.sh, both with `--sdxl`). `form` picks which of `beta_sd15` / `beta_sdxl` applies.
  The sd15 loss's gradient on the winner's prediction at the reference (d_w = 0, c = 1/2) is
  2 r_w (1 - beta/2) / N: beta > 2 would push the winner's error up. In the sdxl form beta enters only c
  (as DPO's sigmoid temperature).
  """
  if form not in DSPO_FORMS:
    raise ValueError(f"dspo form={form!r}; expected one of {DSPO_FORMS}")
  beta = beta_sd15 if form == "sd15" else beta_sdxl
  err_w, err_l, ref_err_w, ref_err_l, dev_w, res_dev_w = _f32(err_w, err_l, ref_err_w, ref_err_l, dev_w, res_dev_w)
  inside = _dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta)
  c = jax.nn.sigmoid(-inside)  # = 1 - sigmoid(inside)
  if form == "sd15":
    loss = jnp.mean(err_w - 2.0 * beta * c * res_dev_w + jnp.square(beta * c) * dev_w)
  else:
    loss = jnp.where(jnp.mean(dev_w) >= 0.1, jnp.mean(jnp.square(c) * dev_w), jnp.mean(jnp.square(c)))
  metrics = _dpo_metrics(loss, inside, err_w, err_l, ref_err_w, ref_err_l)
  metrics["dev_w"] = jnp.mean(dev_w)
  return loss, metrics


def smpo_probability(score_w, score_l, score_scale):
  """SmPO's soft label p = exp(n_w) / (exp(n_w) + exp(n_l)), n = (s - min) / (max - min): sigmoid((s_w - s_l) / scale)."""
  return jax.nn.sigmoid((jnp.asarray(score_w, jnp.float32) - jnp.asarray(score_l, jnp.float32)) / score_scale)


def smpo_loss(err_w, err_l, ref_err_w, ref_err_l, score_w, score_l, *, beta=5000.0, k=10.0,
              score_scale=16.658044606447220) -> tuple[jax.Array, Metrics]:
  """SmPO soft-label DPO (Lu et al., ICML 2025, arXiv 2506.02698; JaydenLyh/SmPO train.py, `smpo`):

      p_i  = sigmoid((s_w,i - s_l,i) / score_scale)          s: the pair's stored reward scores
      loss = mean_i -log_sigmoid(inside_i * (2 p_i - 1) * k)  inside_i: dpo_loss's logit

  The official code normalises PickScore cosines by the data set's range (max - min = 0.28202 - 0.11544)
  before the softmax, which is sigmoid of the difference over that range; `score_scale` defaults to that
  range in the units mapo_jax.rewards' pickscore writes (logit_scale 100 times the cosine): 16.658.
  Ours differs: each pair uses its own p_i (the official collate reads `probs[0]`, the first pair's, for
  the whole per-device batch), and the noise is the step's shared forward noise (SmPO draws it by
  ReNoise inversion with the policy). p = 1/2 (equal scores) makes a pair's term log 2 with no gradient.
  """
  err_w, err_l, ref_err_w, ref_err_l = _f32(err_w, err_l, ref_err_w, ref_err_l)
  inside = _dpo_inside(err_w, err_l, ref_err_w, ref_err_l, beta)
  p = smpo_probability(score_w, score_l, score_scale)
  z = inside * (2.0 * p - 1.0) * k
  loss = -jnp.mean(jax.nn.log_sigmoid(z))
  metrics = _dpo_metrics(loss, inside, err_w, err_l, ref_err_w, ref_err_l)
  metrics["soft_label"] = jnp.mean(p)
  return loss, metrics


def kto_loss(err, ref_err, label, *, beta=1000.0, lambda_d=1.0, lambda_u=1.0) -> tuple[jax.Array, Metrics]:
  """Diffusion-KTO (Li et al., arXiv 2404.04465) on unpaired samples with labels y = +1 / -1, as
  jacklishufan/diffusion-kto train_kto_sd_v1.5.py computes it (`--loss kto --halo sigmoid`):

      g_i  = r_i - l_i                          (policy minus reference log-likelihood, per the ELBO)
      z0   = stop_gradient(max(0, mean_i g_i))  (the batch KL estimate, clamped at 0; the paper's eq. 8)
      loss = mean_i lambda_y (1 - sigmoid(y_i * beta * (g_i - z0)))       lambda_{+1} = lambda_d, lambda_{-1} = lambda_u

  Defaults are the script's (beta_dpo 1000, lambda_d_kto = lambda_u_kto = 1). z0 spans the samples passed
  in: under jit with batch-sharded arrays that is every device's samples of one micro-batch (the official
  code averages each process's mean over processes, the same number for equal shards); with gradient
  accumulation each micro-batch has its own z0, as there. Metrics: loss, kl = z0, accuracy =
  mean(y * (g - z0) > 0), model / reference MSE, and the mean g of desirable and undesirable samples.
  """
  err, ref_err, label = _f32(err, ref_err, label)
  g = ref_err - err
  z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(g), 0.0))
  desirable = label > 0
  margin = label * beta * (g - z0)
  weight = jnp.where(desirable, lambda_d, lambda_u)
  loss = jnp.mean(weight * (1.0 - jax.nn.sigmoid(margin)))
  n_d = jnp.sum(desirable.astype(jnp.float32))
  n_u = label.shape[0] - n_d
  metrics = {
      "loss": loss,
      "kl": z0,
      "accuracy": _mean(margin > 0),
      "model_mse": jnp.mean(err),
      "ref_mse": jnp.mean(ref_err),
      "desirable_fraction": n_d / label.shape[0],
      "g_desirable": jnp.sum(jnp.where(desirable, g, 0.0)) / jnp.maximum(n_d, 1.0),
      "g_undesirable": jnp.sum(jnp.where(desirable, 0.0, g)) / jnp.maximum(n_u, 1.0),
  }
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


def sdpo_loser_scale(err_w, res_wl, *, mu=0.0, max_lambda=1.0):
  """Diffusion-SDPO's loser-gradient scale (Fu et al., arXiv 2511.03317; AIDC-AI/Diffusion-SDPO train.py,
  `get_adaptive_lose_l_scale`), from output-space gradients of A = mean(r_w^2) and B = mean(r_l^2):

      lambda = clip((1 - mu) ||dA||^2 / <dB, dA>, 0, max_lambda)   if <dB, dA> > 0,   else max_lambda

  (the largest lambda with (-dA + lambda dB) . dA <= -mu ||dA||^2, capped). With N the number of winner
  elements, dA = 2 r_w / N and dB = 2 r_l / N, so the ratio is sum_i l_w,i / sum_i res_wl,i with
  res_wl,i = mean_HWC r_w r_l (winner and loser residuals of pair i): the (2/N)^2 cancels. The source adds
  eps = 1e-9 to the (scaled) denominator; we do not (den > 0 is checked first, and a huge ratio clips
  to max_lambda). Sums span the pairs passed in (a micro-batch over all devices; the source: one
  process's micro-batch). Returned under stop_gradient, float32.
  """
  err_w, res_wl = _f32(err_w, res_wl)
  num, den = jnp.sum(err_w), jnp.sum(res_wl)
  lam = jnp.where(den > 0, (1.0 - mu) * num / jnp.where(den > 0, den, 1.0), max_lambda)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max_lambda))


def scale_gradient(x, scale):
  """x in the forward pass; `scale` times x's gradient in the backward pass (scale held constant)."""
  x_const = jax.lax.stop_gradient(x)
  return x_const + scale * (x - x_const)


# The embeddings e_i RPO can compare pairs by: the pooled prompt embedding, or the prompt embeddings
# averaged over tokens (computed when the pairs are encoded).
RPO_EMBEDDINGS = ("pooled", "mean_tokens")

# Inputs an objective can take, besides the hyper-parameters. Per pair i of a paired batch:
#   err_w, err_l          policy errors l = mean_HWC (pred - target)^2 of winner and loser
#   ref_err_w, ref_err_l  the frozen reference's errors on the same inputs (stop_gradient)
#   dev_w                 mean_HWC (pred_w - ref_pred_w)^2          (DSPO)
#   res_dev_w             mean_HWC (pred_w - target_w)(pred_w - ref_pred_w)   (DSPO)
#   emb                   the pair's embedding (RPO)
#   score_w, score_l      the pair's stored reward scores (SmPO)
# Per sample of an unpaired batch: err, ref_err (as above) and label (+1 desirable, -1 undesirable).
REFERENCE_INPUTS = ("ref_err_w", "ref_err_l", "ref_err", "dev_w", "res_dev_w")
SCORE_INPUTS = ("score_w", "score_l")


class Objective(NamedTuple):
  fn: Callable[..., tuple[jax.Array, Metrics]]
  inputs: tuple[str, ...]  # names of fn's positional arguments, in order
  defaults: dict[str, Any]  # hyper-parameters (config block `config.<name>`) and their defaults

  @property
  def needs_reference(self) -> bool:
    return any(k in REFERENCE_INPUTS for k in self.inputs)

  @property
  def needs_embedding(self) -> bool:
    return "emb" in self.inputs

  @property
  def needs_scores(self) -> bool:
    return any(k in SCORE_INPUTS for k in self.inputs)

  @property
  def paired(self) -> bool:
    """Whether it takes the losers' errors (else only winners, or unpaired samples, are denoised)."""
    return "err_l" in self.inputs

  @property
  def unpaired(self) -> bool:
    """Whether it trains on unpaired labelled samples (err, label) rather than pairs."""
    return "label" in self.inputs

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
    "dpo": Objective(dpo_loss, _REF, dict(beta=5000.0, loss_type="sigmoid")),  # official Diffusion-DPO beta_dpo
    "rpo": Objective(rpo_loss, _REF + ("emb",), dict(beta=5000.0, tau=0.5)),
    "sft": Objective(sft_loss, ("err_w",), {}),
    "dmpo": Objective(dmpo_loss, _REF, dict(beta=2000.0, alpha=0.01)),
    # DSPO: each form with the beta its launchers use (dspo_loss); `form` picks which applies.
    "dspo": Objective(dspo_loss, _REF + ("dev_w", "res_dev_w"), dict(form="sd15", beta_sd15=0.001, beta_sdxl=5000.0)),
    "smpo": Objective(smpo_loss, _REF + SCORE_INPUTS, dict(beta=5000.0, k=10.0, score_scale=16.658044606447220)),
    "kto": Objective(kto_loss, ("err", "ref_err", "label"), dict(beta=1000.0, lambda_d=1.0, lambda_u=1.0)),
}
# Wrappers around any paired objective (config.objective_safeguard), with their hyper-parameters
# (config block of the same name). "sdpo": sdpo_loser_scale on the loser's errors.
SAFEGUARDS: dict[str, dict[str, Any]] = {"sdpo": dict(mu=0.0, max_lambda=1.0)}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"objective={name!r}; expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def needs_reference(name: str) -> bool:
  """Whether objective `name` needs the frozen reference model's errors."""
  return get_objective(name).needs_reference


def call_objective(name: str, inputs: dict[str, Any], hparams: dict[str, Any]):
  """Objective `name` on the entries of `inputs` it takes (others are ignored), with keyword options
  `hparams`. A missing or None input it needs is a ValueError naming it."""
  obj = get_objective(name)
  missing = [k for k in obj.inputs if inputs.get(k) is None]
  if missing:
    raise ValueError(f"objective {name!r} needs {missing}")
  return obj.fn(*(inputs[k] for k in obj.inputs), **hparams)


def objective_loss(name, err_w, err_l=None, *, ref_err_w=None, ref_err_l=None, emb=None, **hparams):
  """Calls paired objective `name` with the inputs it takes; `hparams` are its keyword options."""
  given = dict(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l, emb=emb)
  return call_objective(name, given, hparams)
