"""Objectives against hand-computed numbers and straightforward numpy versions of the docs/objectives.md formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapo_jax.training import objectives as obj

LOG2 = math.log(2.0)
# Jitted once per module: the functions must trace, and compiling whole functions is faster than eager.
mapo_loss, dpo_loss, rpo_loss, sft_loss, mapo_score, rpo_weights = map(
    jax.jit, (obj.mapo_loss, obj.dpo_loss, obj.rpo_loss, obj.sft_loss, obj.mapo_score, obj.rpo_weights))


def _errors(seed, b=6, scale=0.2):
  r = np.random.default_rng(seed)
  return [r.uniform(0.0, scale, b).astype(np.float32) for _ in range(4)]


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_mapo(err_w, err_l, beta=0.1, s=0.5, T=1000):
  g = lambda l: s * l / np.expm1(s * l)
  lw, ll = np.float64(err_w), np.float64(err_l)
  return lw.mean() - beta * _np_log_sigmoid(T * (g(lw) - g(ll))).mean()


def _np_rpo(err_w, err_l, ref_w, ref_l, emb, beta, tau):
  """docs/objectives.md Diffusion-RPO written as plain loops."""
  b = len(err_w)
  e = [np.float64(v) / np.linalg.norm(v) for v in emb]
  total = 0.0
  for i in range(b):
    logits = [-(1.0 - e[i] @ e[j]) / tau for j in range(b)]
    m = max(logits)
    weights = [math.exp(x - m) for x in logits]
    weights = [w / sum(weights) for w in weights]
    for j in range(b):
      u_w = -(float(err_w[i]) - float(ref_w[i]))
      u_l = -(float(err_l[j]) - float(ref_l[j]))
      z = beta / 2 * weights[j] * (u_w - u_l)
      total += -_np_log_sigmoid(z)
  return total / b**2


# ---------------------------------------------------------------- Diffusion-DPO
def test_dpo_is_log2_when_policy_equals_reference():
  err_w, err_l, _, _ = _errors(0)
  loss, m = dpo_loss(err_w, err_l, err_w, err_l)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  assert m["implicit_acc"] == 0.0  # every pair is a tie, and ties count as wrong


def test_dpo_hand_computed():
  # beta = 10: inside_1 = -5 * ((0.1 - 0.3) - (0.2 - 0.2)) = 1
  #            inside_2 = -5 * ((0.2 - 0.1) - (0.2 - 0.1)) = 0
  loss, m = dpo_loss(jnp.array([0.1, 0.2]), jnp.array([0.3, 0.1]), jnp.array([0.2, 0.2]),
                         jnp.array([0.2, 0.1]), beta=10.0)
  np.testing.assert_allclose(loss, (math.log1p(math.exp(-1.0)) + LOG2) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["implicit_acc"], 0.5)
  np.testing.assert_allclose(m["margin"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["mse_w"], 0.15, rtol=1e-6)
  np.testing.assert_allclose(m["ref_mse_l"], 0.15, rtol=1e-6)
  np.testing.assert_allclose(m["model_mse"], 0.175, rtol=1e-6)


def test_dpo_matches_numpy_at_default_beta():
  err_w, err_l, ref_w, ref_l = _errors(1, scale=1e-3)  # beta = 5000 wants small error differences
  inside = -0.5 * 5000 * ((np.float64(err_w) - err_l) - (np.float64(ref_w) - ref_l))
  loss, m = dpo_loss(err_w, err_l, ref_w, ref_l)
  np.testing.assert_allclose(loss, -_np_log_sigmoid(inside).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], (inside > 0).mean())


# ---------------------------------------------------------------- Diffusion-RPO
def test_rpo_matches_numpy_loop():
  err_w, err_l, ref_w, ref_l = _errors(2, b=5, scale=1e-3)
  emb = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
  for tau in (0.5, 0.05):
    loss, _ = rpo_loss(err_w, err_l, ref_w, ref_l, emb, tau=tau)
    np.testing.assert_allclose(loss, _np_rpo(err_w, err_l, ref_w, ref_l, emb, 5000.0, tau), rtol=1e-5)


def test_rpo_weights_rows_sum_to_one_and_diagonal_dominates():
  emb = np.random.default_rng(4).normal(size=(4, 16))
  w = np.asarray(rpo_weights(emb, tau=0.5))
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
  assert (np.diag(w) > w.max(axis=1, initial=0.0, where=~np.eye(4, dtype=bool))).all()


def test_rpo_single_pair_equals_dpo():
  err_w, err_l, ref_w, ref_l = [e[:1] for e in _errors(5, scale=1e-3)]
  for tau in (0.5, 3.0):  # with B = 1 the softmax weight is exactly 1
    np.testing.assert_allclose(rpo_loss(err_w, err_l, ref_w, ref_l, np.ones((1, 3)), tau=tau)[0],
                               dpo_loss(err_w, err_l, ref_w, ref_l)[0], rtol=1e-6)


def test_rpo_orthogonal_embeddings_small_tau_reduce_to_dpo_on_the_diagonal():
  # Orthogonal prompts and tau -> 0 make W the identity: z_ii is DPO's inside_i and every off-diagonal
  # z_ij is 0, which contributes -log_sigmoid(0) = log 2. So loss = (DPO + (B - 1) log 2) / B.
  b = 4
  err_w, err_l, ref_w, ref_l = _errors(6, b=b, scale=1e-3)
  emb = np.eye(b) * np.array([1.0, 2.0, 0.5, 3.0])[:, None]  # unnormalised on purpose
  rpo, m = rpo_loss(err_w, err_l, ref_w, ref_l, emb, tau=1e-3)
  dpo, dm = dpo_loss(err_w, err_l, ref_w, ref_l)
  np.testing.assert_allclose(rpo, (dpo + (b - 1) * LOG2) / b, rtol=1e-5)
  np.testing.assert_allclose(m["weight_diag"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["margin"], dm["margin"], rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], dm["accuracy"])


def test_rpo_is_log2_when_policy_equals_reference():
  err_w, err_l, _, _ = _errors(7)
  emb = np.random.default_rng(8).normal(size=(6, 4))
  np.testing.assert_allclose(rpo_loss(err_w, err_l, err_w, err_l, emb)[0], LOG2, rtol=1e-6)


# ---------------------------------------------------------------- SFT
def test_sft_equals_winner_mse():
  r = np.random.default_rng(9)
  pred, target = r.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)  # (B, H, W, C) each
  err_w = ((pred - target) ** 2).mean(axis=(1, 2, 3))
  loss, m = sft_loss(err_w)
  np.testing.assert_allclose(loss, ((np.float64(pred) - target) ** 2).mean(), rtol=1e-6)
  assert m["mse_w"] == loss


# ---------------------------------------------------------------- MaPO
def test_mapo_score_values_and_gradient():
  s = 0.5
  err = np.array([1e-6, 1e-3, 0.0199, 0.0201, 0.5, 3.0, 50.0, 400.0])  # 0.02 is the series switch
  x = s * err
  np.testing.assert_allclose(mapo_score(err, s), x / np.expm1(x), rtol=1e-6, atol=1e-30)
  grad = jax.jit(jax.vmap(jax.grad(lambda l: mapo_score(l, s))))(jnp.asarray(err, jnp.float32))
  dg_dx = (np.expm1(x) - x * np.exp(x)) / np.expm1(x) ** 2
  np.testing.assert_allclose(grad, s * dg_dx, rtol=1e-4, atol=1e-30)
  assert mapo_score(0.0, s) == 1.0
  assert jax.jit(jax.grad(obj.mapo_score))(0.0, s) == -s / 2  # d/dl [sl / (e^{sl} - 1)] at 0


def test_mapo_matches_numpy():
  err_w, err_l, _, _ = _errors(10, scale=0.3)
  for beta, s, T in ((0.1, 0.5, 1000), (1.0, 2.0, 100)):
    loss, m = mapo_loss(err_w, err_l, beta=beta, snr=s, num_timesteps=T)
    np.testing.assert_allclose(loss, _np_mapo(err_w, err_l, beta, s, T), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["mse_w"] + m["or_loss"], rtol=1e-6)


def test_mapo_hand_computed_equal_errors():
  # g_w == g_l: the odds-ratio term is beta * log 2 and the SFT term is mean(err_w).
  err = jnp.array([0.1, 0.3])
  loss, m = mapo_loss(err, err)
  np.testing.assert_allclose(loss, 0.2 + 0.1 * LOG2, rtol=1e-6)
  np.testing.assert_allclose(m["or_loss"], 0.1 * LOG2, rtol=1e-6)
  assert m["accuracy"] == 0.0 and m["margin"] == 0.0


def test_mapo_gradient_lowers_winner_error_and_raises_loser_error():
  err_w, err_l, _, _ = _errors(11, scale=0.5)
  gw, gl = jax.jit(jax.grad(lambda w, l: obj.mapo_loss(w, l)[0], argnums=(0, 1)))(err_w, err_l)
  assert (np.asarray(gw) > 0).all()  # descent lowers the winner error
  assert (np.asarray(gl) < 0).all()  # descent raises the loser error
  assert (np.asarray(gl) != 0).any()


@jax.jit
def _losses_and_grads(w, l, ref_w, ref_l, emb):
  fns = {
      "mapo": lambda w, l: mapo_loss(w, l),
      "dpo": lambda w, l: dpo_loss(w, l, ref_w, ref_l),
      "rpo": lambda w, l: rpo_loss(w, l, ref_w, ref_l, emb),
      "sft": lambda w, l: sft_loss(w),
  }
  return {k: (f(w, l), jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1))(w, l)) for k, f in fns.items()}


@pytest.mark.parametrize("value", [0.0, 50.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_objectives_finite_at_extreme_errors(value, dtype):
  extreme = jnp.full((3,), value, dtype)
  mixed = jnp.array([0.0, 0.1, 50.0], dtype)
  for w, l in ((extreme, mixed), (mixed, extreme), (extreme, extreme)):
    results = _losses_and_grads(w, l, mixed, extreme, jnp.eye(3, dtype=dtype))
    for name, ((loss, metrics), grads) in results.items():
      assert loss.dtype == jnp.float32, name
      assert all(np.isfinite(v) and v.dtype == jnp.float32 for v in metrics.values()), name
      assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads), name


# ---------------------------------------------------------------- dispatch
def test_dispatch_by_name_matches_direct_calls_under_jit():
  err_w, err_l, ref_w, ref_l = _errors(12, scale=1e-3)
  emb = np.random.default_rng(13).normal(size=(6, 4))
  direct = {
      "mapo": mapo_loss(err_w, err_l)[0],
      "dpo": dpo_loss(err_w, err_l, ref_w, ref_l)[0],
      "rpo": rpo_loss(err_w, err_l, ref_w, ref_l, emb, tau=0.3)[0],
      "sft": sft_loss(err_w)[0],
  }
  hparams = {"rpo": {"tau": 0.3}}
  for name, expected in direct.items():
    fn = jax.jit(lambda *a, name=name: obj.objective_loss(name, *a[:2], ref_err_w=a[2], ref_err_l=a[3],
                                                          emb=a[4], **hparams.get(name, {}))[0])
    np.testing.assert_allclose(fn(err_w, err_l, ref_w, ref_l, emb), expected, rtol=1e-6)
  assert [n for n in obj.OBJECTIVES if obj.needs_reference(n)] == ["dpo", "rpo", "dmpo", "dspo", "smpo", "kto"]
  with pytest.raises(ValueError, match="ref_err_w"):
    obj.objective_loss("dpo", err_w, err_l)
  with pytest.raises(ValueError, match="objective='ppo'"):
    obj.needs_reference("ppo")
