"""The objectives of issue 16 (DPO loss types, DMPO, DSPO, SmPO, Diffusion-KTO) and the Diffusion-SDPO
safeguard: hand-derived values, and float64 NumPy transcriptions of their sources' code (docs/objectives.md).
Last, every registered objective at its defaults: a small step from the reference must train the winner."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapo_jax.training import objectives as obj

LOG2 = math.log(2.0)
# float32 inputs with float64 references: a few ulps per operation, amplified by at most beta * |error|
# (well below 1e-5 relative at the scales used here).
RTOL = 1e-5


def _errors(seed, b=6, scale=1e-3, n=4):
  r = np.random.default_rng(seed)
  return [r.uniform(0.0, scale, b).astype(np.float32) for _ in range(n)]


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@functools.partial(jax.jit, static_argnames=("name", "hp"))
def _call(name, inputs, hp=()):
  return obj.call_objective(name, inputs, dict(obj.OBJECTIVES[name].defaults, **dict(hp)))


def call(name, **kw):
  hp = tuple(sorted((k, v) for k, v in kw.items() if not isinstance(v, np.ndarray)))
  inputs = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
  return _call(name, inputs, hp)


def pair(seed, b=6, scale=1e-3):
  w, l, rw, rl = _errors(seed, b, scale)
  return dict(err_w=w, err_l=l, ref_err_w=rw, ref_err_l=rl)


# ---------------------------------------------------------------- DPO loss types (diffusers' loss_type)
def _np_diffusers_dpo(e, beta_dpo, loss_type):
  """diffusers train_diffusion_dpo.py: logits = ref_diff - model_diff, then its three branches."""
  model_diff = np.float64(e["err_w"]) - e["err_l"]
  ref_diff = np.float64(e["ref_err_w"]) - e["ref_err_l"]
  logits = ref_diff - model_diff
  if loss_type == "sigmoid":
    return (-_np_log_sigmoid(beta_dpo * logits)).mean()
  if loss_type == "hinge":
    return np.maximum(1 - beta_dpo * logits, 0).mean()
  return ((logits - 1 / (2 * beta_dpo)) ** 2).mean()


@pytest.mark.parametrize("loss_type", obj.DPO_LOSS_TYPES)
def test_dpo_loss_types_match_diffusers_transcription(loss_type):
  e = pair(20)
  for beta in (5000.0, 300.0):  # our beta = 2 * diffusers' beta_dpo
    loss, _ = call("dpo", beta=beta, loss_type=loss_type, **e)
    np.testing.assert_allclose(loss, _np_diffusers_dpo(e, beta / 2, loss_type), rtol=RTOL)


def test_dpo_hinge_and_ipo_hand_computed():
  # beta = 10: inside = (1, 0) (as tests/test_objectives.py), logit = inside / 5 = (0.2, 0).
  e = dict(err_w=np.array([0.1, 0.2], np.float32), err_l=np.array([0.3, 0.1], np.float32),
           ref_err_w=np.array([0.2, 0.2], np.float32), ref_err_l=np.array([0.2, 0.1], np.float32))
  np.testing.assert_allclose(call("dpo", beta=10.0, loss_type="hinge", **e)[0], (0.0 + 1.0) / 2, rtol=1e-6)
  # ipo: ((0.2 - 1/10)^2 + (0 - 1/10)^2) / 2 = 0.01
  np.testing.assert_allclose(call("dpo", beta=10.0, loss_type="ipo", **e)[0], 0.01, rtol=1e-5)
  same = dict(e, ref_err_w=e["err_w"], ref_err_l=e["err_l"])  # policy == reference
  assert float(call("dpo", loss_type="hinge", **same)[0]) == 1.0
  np.testing.assert_allclose(call("dpo", loss_type="ipo", **same)[0], 1 / 5000.0**2, rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type='squared'"):
    obj.dpo_loss(*e.values(), loss_type="squared")


# ---------------------------------------------------------------- DMPO
def _np_dmpo(e, beta, alpha):
  """AIDC-AI/Diffusion-SDPO train.py `dmpo`: KL(p || q) with p = sigmoid(u), q = clamp(1 - alpha)."""
  u = -0.5 * beta * ((np.float64(e["err_w"]) - e["err_l"]) - (np.float64(e["ref_err_w"]) - e["ref_err_l"]))
  p = _np_sigmoid(u)
  q = np.clip(1.0 - alpha, 1e-6, 1 - 1e-6)
  return (p * (np.log(p) - np.log(q)) + (1 - p) * (np.log1p(-p) - np.log1p(-q))).mean()


def test_dmpo_matches_transcription():
  e = pair(21)
  for beta, alpha in ((2000.0, 0.01), (5000.0, 0.3), (2000.0, 0.0)):
    np.testing.assert_allclose(call("dmpo", beta=beta, alpha=alpha, **e)[0], _np_dmpo(e, beta, alpha), rtol=RTOL)


def test_dmpo_hand_computed():
  e = pair(22)
  same = dict(e, ref_err_w=e["err_w"], ref_err_l=e["err_l"])  # u = 0, p = 1/2
  assert abs(float(call("dmpo", alpha=0.5, **same)[0])) < 1e-7  # p == q: KL = 0
  expected = 0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01)
  np.testing.assert_allclose(call("dmpo", alpha=0.01, **same)[0], expected, rtol=1e-6)


# ---------------------------------------------------------------- DSPO
def _dspo_arrays(seed, b=4, shape=(4, 4, 2), ref_offset=0.05):
  r = np.random.default_rng(seed)
  target = r.normal(size=(2, b) + shape)
  pred = target + r.normal(size=(2, b) + shape) * 0.7
  ref = pred + r.normal(size=(2, b) + shape) * ref_offset
  return pred, ref, target


def _dspo_inputs(pred, ref, target):
  """Our per-sample inputs from the arrays (what train_step.per_sample_statistics computes)."""
  m = lambda x: x.mean(axis=(1, 2, 3))
  return dict(err_w=m((pred[0] - target[0]) ** 2), err_l=m((pred[1] - target[1]) ** 2),
              ref_err_w=m((ref[0] - target[0]) ** 2), ref_err_l=m((ref[1] - target[1]) ** 2),
              dev_w=m((pred[0] - ref[0]) ** 2), res_dev_w=m((pred[0] - target[0]) * (pred[0] - ref[0])))


def _np_dspo(pred, ref, target, beta, form):
  """huaishengzhu/DSPO train.py `dspo` (the same lines in AIDC-AI/Diffusion-SDPO train.py) on whole prediction
  arrays, float64."""
  m = lambda x: x.mean(axis=(-3, -2, -1))
  model_losses = m((pred - target) ** 2)  # (2, B)
  ref_losses = m((ref - target) ** 2)
  inside = -0.5 * beta * ((model_losses[0] - model_losses[1]) - (ref_losses[0] - ref_losses[1]))
  c = (1 - _np_sigmoid(inside))[:, None, None, None]
  pred2 = pred[0] - ref[0]
  if form == "sdxl":
    if m(pred2 ** 2).mean() >= 0.1:
      return m((c * pred2) ** 2).mean()
    return m(np.broadcast_to(c, pred2.shape) ** 2).mean()
  return m((pred[0] - target[0] - beta * c * pred2) ** 2).mean()


@pytest.mark.parametrize("form,ref_offset", [("sd15", 0.05), ("sdxl", 0.05), ("sdxl", 0.6)])
def test_dspo_matches_transcription(form, ref_offset):
  pred, ref, target = _dspo_arrays(23, ref_offset=ref_offset)
  inputs = {k: v.astype(np.float32) for k, v in _dspo_inputs(pred, ref, target).items()}
  for beta in (5.0, 50.0):  # keeps sigmoid(inside) away from 0 and 1 at these error spreads
    loss, m = call("dspo", form=form, **{f"beta_{form}": beta}, **inputs)
    np.testing.assert_allclose(loss, _np_dspo(pred, ref, target, beta, form), rtol=1e-5)
  assert (float(m["dev_w"]) >= 0.1) == (ref_offset > 0.5)  # both sdxl branches are exercised


def test_dspo_hand_computed():
  pred, _, target = _dspo_arrays(24)
  inputs = {k: v.astype(np.float32) for k, v in _dspo_inputs(pred, pred, target).items()}  # ref == policy
  # d_w = 0: the sd15 loss is the winner MSE; sdxl takes its small-deviation branch, c = 1/2: 1/4.
  np.testing.assert_allclose(call("dspo", form="sd15", **inputs)[0], inputs["err_w"].mean(), rtol=1e-6)
  np.testing.assert_allclose(call("dspo", form="sdxl", **inputs)[0], 0.25, rtol=1e-6)


# ---------------------------------------------------------------- SmPO
def _np_smpo(e, s_w, s_l, beta, k, lo, hi):
  """JaydenLyh/SmPO train.py: min-max normalised scores, softmax probability, scaled DPO logit."""
  n_w, n_l = (np.float64(s_w) - lo) / (hi - lo), (np.float64(s_l) - lo) / (hi - lo)
  p = np.exp(n_w) / (np.exp(n_w) + np.exp(n_l))
  scale_term = -0.5 * beta * (2 * p - 1) * k
  inside = scale_term * ((np.float64(e["err_w"]) - e["err_l"]) - (np.float64(e["ref_err_w"]) - e["ref_err_l"]))
  return (-_np_log_sigmoid(inside)).mean()


def test_smpo_matches_transcription():
  e = pair(25, scale=1e-4)
  r = np.random.default_rng(26)
  lo, hi = 0.11543526500463486, 0.28201571106910706  # the source's PickScore cosine range
  s_w, s_l = r.uniform(lo, hi, 6), r.uniform(lo, hi, 6)
  # Our scores are PickScore logits (100 x cosine, mapo_jax.rewards); the default scale is 100 (hi - lo).
  loss, m = call("smpo", score_w=(100 * s_w).astype(np.float32), score_l=(100 * s_l).astype(np.float32), **e)
  np.testing.assert_allclose(loss, _np_smpo(e, s_w, s_l, 5000.0, 10.0, lo, hi), rtol=RTOL)
  np.testing.assert_allclose(obj.OBJECTIVES["smpo"].defaults["score_scale"], 100 * (hi - lo), rtol=1e-12)


def test_smpo_hand_computed():
  e = pair(27)
  equal = np.full(6, 21.5, np.float32)
  np.testing.assert_allclose(call("smpo", score_w=equal, score_l=equal, **e)[0], LOG2, rtol=1e-6)  # p = 1/2
  # One pair, inside = 1 (beta = 10, as test_dpo_hinge_and_ipo_hand_computed), p = sigmoid(1) with
  # score_scale 1: loss = -log sigmoid(1 * (2 sigmoid(1) - 1) * k) with k = 2.
  one = dict(err_w=np.array([0.1], np.float32), err_l=np.array([0.3], np.float32),
             ref_err_w=np.array([0.2], np.float32), ref_err_l=np.array([0.2], np.float32))
  z = (2 / (1 + math.exp(-1)) - 1) * 2
  loss, _ = call("smpo", beta=10.0, k=2.0, score_scale=1.0, score_w=np.array([1.0], np.float32),
                 score_l=np.array([0.0], np.float32), **one)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-z)), rtol=1e-6)


# ---------------------------------------------------------------- Diffusion-KTO
def _np_kto(err, ref, labels01, beta, lambda_d, lambda_u):
  """jacklishufan/diffusion-kto train_kto_sd_v1.5.py (`--loss kto --halo sigmoid`), labels in {0, 1}."""
  g = -np.float64(err) - (-np.float64(ref))  # policy_KL_logps - reference_KL_logps
  kl = max(g.mean(), 0.0)
  g = g - kl
  sgn = 2 * labels01 - 1
  h = _np_sigmoid(sgn * beta * g)
  w = np.where(labels01 == 1, lambda_d, lambda_u)
  return (w * (1 - h)).mean(), kl


@pytest.mark.parametrize("shift", [0.0, 2e-4, -2e-4])  # mean g about 0, > 0 and < 0 (the clamp)
def test_kto_matches_transcription(shift):
  err, ref = _errors(28, b=8, n=2)
  ref = (ref + shift).astype(np.float32)
  labels01 = np.array([1, 0, 1, 1, 0, 0, 1, 0])
  for beta, ld, lu in ((1000.0, 1.0, 1.0), (3000.0, 2.0, 0.5)):
    loss, m = call("kto", err=err, ref_err=ref, label=(2.0 * labels01 - 1).astype(np.float32), beta=beta,
                   lambda_d=ld, lambda_u=lu)
    expected, kl = _np_kto(err, ref, labels01, beta, ld, lu)
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    np.testing.assert_allclose(m["kl"], kl, atol=1e-9)
  if shift:
    assert (float(m["kl"]) == 0.0) == (shift < 0)


def test_kto_hand_computed_and_z0_carries_no_gradient():
  err = np.array([0.2, 0.4], np.float32)
  label = np.array([1.0, -1.0], np.float32)
  # policy == reference: g = 0, z0 = 0, each term lambda_y / 2.
  np.testing.assert_allclose(call("kto", err=err, ref_err=err, label=label, lambda_d=2.0)[0], (2 * 0.5 + 0.5) / 2)
  # The gradient is that of the loss with z0 held fixed: d/dl_i = lambda_y y beta s(1 - s) / B.
  ref = np.array([0.2005, 0.3999], np.float32)
  beta = 1000.0
  grad = jax.grad(lambda e: obj.kto_loss(e, ref, label, beta=beta)[0])(jnp.asarray(err))
  g = np.float64(ref) - err
  s = _np_sigmoid(label * beta * (g - max(g.mean(), 0)))
  np.testing.assert_allclose(grad, label * beta * s * (1 - s) / 2, rtol=1e-4)


# ---------------------------------------------------------------- Diffusion-SDPO safeguard
def _np_sdpo_scale(pred, target, mu, max_lambda=1.0, eps=1e-9):
  """AIDC-AI/Diffusion-SDPO train.py `get_adaptive_lose_l_scale` with its autograd gradients written out:
  A = mean (pred_w - true_w)^2 -> dA = 2 (pred_w - true_w) / N, likewise dB."""
  n = pred[0].size
  g_a = 2 * (pred[0] - target[0]) / n
  g_b = 2 * (pred[1] - target[1]) / n
  num, den = (g_a ** 2).sum(), (g_b * g_a).sum()
  lam = (1 - mu) * num / (den + eps) if den > 0 else max_lambda
  return float(np.clip(lam, 0.0, max_lambda))


def _residual_stats(pred, target):
  m = lambda x: x.mean(axis=(1, 2, 3))
  return m((pred[0] - target[0]) ** 2).astype(np.float32), m((pred[0] - target[0]) * (pred[1] - target[1])).astype(np.float32)


def test_sdpo_scale_matches_transcription():
  r = np.random.default_rng(29)
  target = r.normal(size=(2, 4, 4, 4, 2))
  base = r.normal(size=(4, 4, 4, 2))
  for corr, mu, cap in ((0.9, 0.0, 1.0), (0.9, 0.6, 1.0), (0.3, 0.2, 5.0), (-0.8, 0.5, 1.0)):
    pred = target + np.stack([base, corr * base + (1 - abs(corr)) * r.normal(size=base.shape)])
    err_w, res_wl = _residual_stats(pred, target)
    lam = obj.sdpo_loser_scale(err_w, res_wl, mu=mu, max_lambda=cap)
    np.testing.assert_allclose(lam, _np_sdpo_scale(pred, target, mu, cap), rtol=1e-5)


def test_sdpo_scale_hand_computed():
  err_w = np.array([0.5, 1.5], np.float32)
  # r_l = r_w: <dB, dA> = ||dA||^2, so lambda = 1 - mu; r_l = -r_w: <dB, dA> < 0, lambda = max_lambda.
  np.testing.assert_allclose(obj.sdpo_loser_scale(err_w, err_w, mu=0.3), 0.7, rtol=1e-6)
  assert float(obj.sdpo_loser_scale(err_w, -err_w, mu=0.3, max_lambda=0.8)) == pytest.approx(0.8)
  assert float(obj.sdpo_loser_scale(err_w, err_w, mu=1.0)) == 0.0  # mu = 1 freezes an aligned loser
  np.testing.assert_allclose(obj.sdpo_loser_scale(err_w, err_w / 4, mu=0.0, max_lambda=10.0), 4.0, rtol=1e-6)


def test_scale_gradient_scales_only_the_loser_gradient():
  e = {k: jnp.asarray(v) for k, v in pair(30).items()}
  def loss(err_w, err_l, lam):
    return obj.dpo_loss(err_w, obj.scale_gradient(err_l, lam), e["ref_err_w"], e["ref_err_l"])[0]
  plain = jax.grad(loss, argnums=(0, 1))(e["err_w"], e["err_l"], 1.0)
  scaled = jax.grad(loss, argnums=(0, 1))(e["err_w"], e["err_l"], 0.25)
  np.testing.assert_array_equal(loss(e["err_w"], e["err_l"], 0.25), loss(e["err_w"], e["err_l"], 1.0))
  np.testing.assert_allclose(scaled[0], plain[0], rtol=1e-7)
  np.testing.assert_allclose(scaled[1], 0.25 * plain[1], rtol=1e-6)


# ---------------------------------------------------------------- registry
def test_registry_says_what_each_objective_needs():
  table = {n: (o.needs_reference, o.paired, o.unpaired, o.needs_scores) for n, o in obj.OBJECTIVES.items()}
  assert table["dmpo"] == table["dspo"] == (True, True, False, False)
  assert table["smpo"] == (True, True, False, True)
  assert table["kto"] == (True, False, True, False)
  with pytest.raises(ValueError, match="score_w"):
    obj.call_objective("smpo", pair(31), {})


@pytest.mark.parametrize("name", ["dmpo", "dspo", "smpo", "kto"])
@pytest.mark.parametrize("value", [0.0, 50.0])
def test_new_objectives_finite_at_extreme_errors(name, value):
  x = np.array([value, 0.1, 0.0], np.float32)
  y = np.array([0.0, 50.0, value], np.float32)
  inputs = dict(err_w=x, err_l=y, ref_err_w=y, ref_err_l=x, dev_w=x, res_dev_w=y, score_w=x, score_l=y,
                err=x, ref_err=y, label=np.array([1, -1, 1], np.float32))
  names = obj.OBJECTIVES[name].inputs
  grads = jax.grad(lambda a: obj.call_objective(name, dict(inputs, **a), obj.OBJECTIVES[name].defaults)[0])(
      {k: jnp.asarray(inputs[k]) for k in names if k not in ("label",) + obj.SCORE_INPUTS})
  loss, metrics = call(name, **{k: inputs[k] for k in names})
  assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
  assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


# ---------------------------------------------------------------- every objective's defaults train the winner
def _default_cases():
  """Every registered objective at its defaults; DSPO in each form (each with its own default beta); the SDPO
  safeguard on DPO."""
  cases = [pytest.param(name, {}, "", id=name) for name in obj.OBJECTIVES]
  cases += [pytest.param("dspo", {"form": form}, "", id=f"dspo-{form}") for form in obj.DSPO_FORMS
            if form != obj.OBJECTIVES["dspo"].defaults["form"]]
  return cases + [pytest.param("dpo", {}, "sdpo", id="dpo-sdpo")]


@pytest.mark.parametrize("name,override,safeguard", _default_cases())
def test_a_small_step_at_the_reference_lowers_the_winners_error(name, override, safeguard):
  """At policy = reference, on per-sample statistics computed from prediction, target and reference tensors (as
  train_step.per_sample_statistics does), a small gradient step on the predictions must lower every winner's
  error (KTO: every desirable sample's) and must not lower any loser's error more than its winner's. A default
  that fails this trains the preferred samples away: DSPO's sd15 form carries (1 - beta c) on the winner's
  prediction (c = 1/2 at the reference), which beta = 5000 turns into -2499."""
  b, shape = 6, (8, 8, 4)
  r = np.random.default_rng(40)
  target = r.standard_normal((2, b) + shape).astype(np.float32)
  res_w = r.standard_normal((b,) + shape).astype(np.float32)
  # The loser's residual correlates with the winner's (same noise and timestep), so the safeguard acts (lambda < 1).
  res_l = (1.2 * res_w + 0.3 * r.standard_normal((b,) + shape)).astype(np.float32)
  preds = jnp.asarray(target + np.stack([res_w, res_l]))
  ref = preds  # policy = reference
  hparams = dict(obj.OBJECTIVES[name].defaults, **override)
  emb = r.standard_normal((b, 16)).astype(np.float32)
  scores = np.sort(r.uniform(18, 24, (2, b)).astype(np.float32), axis=0)[::-1]  # the stored rewards agree: s_w > s_l
  mean = lambda x: jnp.mean(x, axis=(1, 2, 3))

  def errors(p):
    return mean(jnp.square(p[0] - target[0])), mean(jnp.square(p[1] - target[1]))

  def loss(p):
    err_w, err_l = errors(p)
    s = dict(err_w=err_w, err_l=err_l, ref_err_w=mean(jnp.square(ref[0] - target[0])),
             ref_err_l=mean(jnp.square(ref[1] - target[1])), dev_w=mean(jnp.square(p[0] - ref[0])),
             res_dev_w=mean((p[0] - target[0]) * (p[0] - ref[0])), emb=emb, score_w=scores[0], score_l=scores[1])
    if safeguard:
      scale = obj.sdpo_loser_scale(err_w, mean((p[0] - target[0]) * (p[1] - target[1])), **obj.SAFEGUARDS[safeguard])
      assert 0 < float(scale) < 1  # the safeguard is active on these residuals
      s["err_l"] = obj.scale_gradient(err_l, scale)
    if obj.OBJECTIVES[name].unpaired:  # the pairs as 2B labelled samples (train_step.pairs_as_unpaired)
      s = dict(err=jnp.concatenate([s["err_w"], s["err_l"]]), ref_err=jnp.concatenate([s["ref_err_w"], s["ref_err_l"]]),
               label=jnp.concatenate([jnp.ones(b), -jnp.ones(b)]))
    return obj.call_objective(name, s, hparams)[0]

  grad = jax.grad(loss)(preds)
  step = 1e-3 * jnp.linalg.norm(preds - target) / jnp.linalg.norm(grad)  # 0.1 % of the residuals' norm
  (w0, l0), (w1, l1) = errors(preds), errors(preds - step * grad)
  dw, dl = np.asarray(w1 - w0), np.asarray(l1 - l0)
  assert (dw < 0).all(), f"{name} {override} {safeguard}: the winners' errors change by {dw}"
  assert (dl >= dw).all(), f"{name} {override} {safeguard}: losers {dl} fall more than winners {dw}"
