"""What the step does to a batch before the noise (empty prompts, label noise, fixed time ids), the
held-out split, transformers-equivalent Adafactor, and the cache's VAE check; all in-process, no model."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapo_jax import config as config_lib
from mapo_jax.training import optim
from mapo_jax.data.loader import holdout_split
from mapo_jax.training.train_step import StepConfig, augment_batch, prepare_batch

PAIRS, STEPS = 8, 200
EMPTY = {"prompt_embeds": np.full((5, 24), -7.0, np.float32), "pooled_prompt_embeds": np.full((16,), -7.0, np.float32)}


def batch(pairs=PAIRS):
  rng = np.random.default_rng(0)
  f = lambda *s: rng.uniform(1, 2, s).astype(np.float32)  # positive: never equal to EMPTY's -7
  return dict(moments_w=f(pairs, 4, 4, 8), moments_l=-f(pairs, 4, 4, 8), prompt_embeds=f(pairs, 5, 24),
              pooled_prompt_embeds=f(pairs, 16), time_ids=np.tile(np.float32([[512, 640, 3, 9, 64, 64]]), (pairs, 1)),
              rpo_emb=f(pairs, 16))


def within_binomial(count, n, p):
  """|count − np| <= 4·sqrt(n·p·(1−p)): the count of n independent Bernoulli(p) draws has mean np and
  standard deviation sqrt(n·p·(1−p)); by the normal approximation (n·p >= 160 here) a 4-sigma deviation has
  probability about 6e-5, and the draws are fixed keys, so a pass is deterministic, not flaky."""
  return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("empty_p, flip_p", [(0.2, 0.1)])
def test_empty_prompts_and_label_noise_at_their_rates(empty_p, flip_p):
  cfg = StepConfig(objective="mapo", hparams={}, latents=None, empty_prompt_prob=empty_p, label_noise_prob=flip_p)
  b = jax.tree.map(jnp.asarray, batch())
  root = jax.random.key(0)

  @jax.jit
  def one(step):  # the step's key, as make_train_step folds it
    out, stats = augment_batch(jax.random.fold_in(root, step), b, EMPTY, cfg)
    dropped = jnp.all(out["prompt_embeds"] == -7.0, axis=(1, 2))
    flipped = jnp.all(out["moments_w"] < 0, axis=(1, 2, 3))
    return dropped, flipped, out, stats

  dropped, flipped, out, stats = jax.vmap(one)(jnp.arange(STEPS))
  n = STEPS * PAIRS
  assert within_binomial(int(dropped.sum()), n, empty_p), int(dropped.sum())
  assert within_binomial(int(flipped.sum()), n, flip_p), int(flipped.sum())
  # The two draws are independent streams (not the same mask), logged as per-step fractions.
  assert not np.array_equal(dropped, flipped)
  np.testing.assert_allclose(stats["empty_prompt_fraction"], dropped.mean(axis=1))
  np.testing.assert_allclose(stats["label_flip_fraction"], flipped.mean(axis=1))
  # A dropped pair has both prompt keys of the empty prompt; time ids and rpo_emb are never swapped; a
  # flipped pair has winner and loser exchanged, not copied.
  pooled_dropped = jnp.all(out["pooled_prompt_embeds"] == -7.0, axis=2)
  np.testing.assert_array_equal(pooled_dropped, dropped)
  np.testing.assert_array_equal(out["time_ids"], np.broadcast_to(b["time_ids"], out["time_ids"].shape))
  np.testing.assert_array_equal(out["rpo_emb"], np.broadcast_to(b["rpo_emb"], out["rpo_emb"].shape))
  np.testing.assert_array_equal(jnp.all(out["moments_l"] > 0, axis=(2, 3, 4)), flipped)
  # The same step's key gives the same choices (what makes a resumed run bit-identical).
  again = one(17)
  np.testing.assert_array_equal(again[0], dropped[17])
  np.testing.assert_array_equal(again[1], flipped[17])


def test_off_by_default_and_fixed_time_ids():
  b = batch()
  out, stats = augment_batch(jax.random.key(0), b, None, StepConfig(objective="mapo", hparams={}, latents=None))
  assert stats == {} and all(out[k] is b[k] for k in b)
  fixed = prepare_batch(b, StepConfig(objective="mapo", hparams={}, latents=None,
                                      fixed_time_ids=(64.0, 64.0, 0.0, 0.0, 64.0, 64.0)))
  np.testing.assert_array_equal(fixed["time_ids"], np.tile(np.float32([[64, 64, 0, 0, 64, 64]]), (PAIRS, 1)))


def test_holdout_split_is_fixed_and_disjoint():
  train, held = holdout_split(100, 8)
  assert len(held) == 8 and len(train) == 92 and not set(train) & set(held)
  assert set(train) | set(held) == set(range(100))
  np.testing.assert_array_equal(holdout_split(100, 8)[1], held)
  with pytest.raises(ValueError, match="eval_pairs"):
    holdout_split(8, 8)


def test_adafactor_matches_transformers():
  """optim.adafactor = transformers.Adafactor(lr, weight_decay, clip_threshold=1.0, scale_parameter=False,
  relative_step=False) as the official Diffusion-DPO trainer calls it, on a factored (>= 128 x 128) matrix."""
  torch = pytest.importorskip("torch")
  from transformers.optimization import Adafactor
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal((128, 160)).astype(np.float32)
  grads = [rng.standard_normal(p0.shape).astype(np.float32) * s for s in (1.0, 0.1, 3.0)]
  lr, wd = 1e-3, 1e-2
  tp = torch.nn.Parameter(torch.tensor(p0))
  topt = Adafactor([tp], lr=lr, weight_decay=wd, clip_threshold=1.0, scale_parameter=False, relative_step=False)
  tx = optim.adafactor(lr, weight_decay=wd)
  params = jnp.asarray(p0)
  state = tx.init(params)
  for g in grads:
    tp.grad = torch.tensor(g)
    topt.step()
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = params + updates
  np.testing.assert_allclose(np.asarray(params), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cache_encoded_by_another_vae_is_refused():
  from mapo_jax.run.guards import check_cache_vae
  check_cache_vae({}, "/c", "")  # older caches, no `vae`: the pipeline's own
  check_cache_vae({"vae": "/models/fix"}, "/c", "/models/fix/")
  for manifest, vae in (({}, "/models/fix"), ({"vae": "/models/fix"}, ""), ({"vae": "/a"}, "/b")):
    with pytest.raises(config_lib.ConfigError, match="^config.vae: "):
      check_cache_vae(manifest, "/c", vae)
