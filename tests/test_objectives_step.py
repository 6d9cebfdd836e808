"""The issue-16 objectives, min-SNR weighting, the SDPO safeguard and EMA inside the jitted, sharded train
step: each lowers its loss on a fixed batch, a sharded step equals the single-device one, accumulation
equals the large batch for the per-pair objectives, and EMA checkpoints resume bit-identically.

A tiny two-matrix denoiser with logically-sharded weights stands in for the UNet (the UNet-level wiring is
tests/test_train_step.py's): compiling it takes well under a second, so every objective gets every test.
The last test is the exception: DPO's margin at step 0 in the recipes' bf16 numerics needs a real UNet (the
shipped toy base, mapo_jax/toy/base) and is compared with the official PyTorch step (diffusers' UNet).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2
from flax import nnx

from mapo_jax import diffusion, sharding
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.run.checkpoint import Checkpointer, abstract_like
from mapo_jax.pipelines import sd
from mapo_jax.training.train_step import (LATENT_KEYS, Frozen, StepConfig, branches, create_sharded_state, draw_noise,
                                          jit_train_step, make_loss_fn, make_train_step, min_snr_weights,
                                          pairs_as_unpaired, per_sample_errors, per_sample_statistics, predictions,
                                          training_latents)

SCHEDULE = diffusion.NoiseSchedule.from_config(dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
LATENTS = sd.Latents(scale=0.13025)
C, D, H = 4, 16, 32  # latent channels, pooled embedding width, hidden width


class TinyDenoiser(nnx.Module):
  """pred = tanh(x W_in + (pooled W_cond) * (1 + t / T)) W_out, weights sharded by logical axes."""

  def __init__(self, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    w = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[0])
    self.w_in = nnx.Param(w(keys[0], (C, H)), axes=("embed", "mlp"))
    self.w_cond = nnx.Param(w(keys[1], (D, H)), axes=("kv_embed", "mlp"))
    self.w_out = nnx.Param(w(keys[2], (H, C)), axes=("mlp", "embed"))

  def __call__(self, x, t, pooled):
    scale = (1.0 + t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    h = jnp.tanh(x @ self.w_in[...] + (pooled @ self.w_cond[...])[:, None, None, :] * scale)
    return h @ self.w_out[...]


def denoise(model, x, t, cond):
  return model(x, t, cond["pooled_prompt_embeds"])


def make_batch(pairs=8, seed=0, size=8, unpaired=False):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  moments = lambda: np.concatenate([f(pairs, size, size, C) * 5, f(pairs, size, size, C) - 4], -1)
  batch = dict(pooled_prompt_embeds=f(pairs, D))
  if unpaired:
    return dict(batch, moments=moments(), label=np.where(rng.random(pairs) < 0.5, 1.0, -1.0).astype(np.float32))
  # Winners' latents smaller than the losers': a preference the tiny model can learn from the latents alone
  # (a pair's winner and loser share its conditioning).
  winners = moments()
  winners[..., :C] *= 0.2
  return dict(batch, moments_w=winners, moments_l=moments(), score_w=f(pairs) * 3 + 20, score_l=f(pairs) * 3 + 20)


# name -> (objective, hyper-parameter overrides, StepConfig extras, unpaired batch). Betas are lowered from
# the recipes' so that the tiny model's errors (O(1), not O(1e-3)) keep the sigmoids away from saturation.
CASES = {
    "dpo_hinge": ("dpo", dict(beta=20.0, loss_type="hinge"), {}, False),
    "dpo_ipo": ("dpo", dict(beta=20.0, loss_type="ipo"), {}, False),
    "dmpo": ("dmpo", dict(beta=20.0), {}, False),
    "dspo_sd15": ("dspo", dict(beta_sd15=2.0), {}, False),
    "dspo_sdxl": ("dspo", dict(beta_sdxl=20.0, form="sdxl"), {}, False),
    "smpo": ("smpo", dict(beta=20.0, k=2.0, score_scale=3.0), {}, False),
    "kto_unpaired": ("kto", dict(beta=20.0), {}, True),
    "kto_pairs": ("kto", dict(beta=20.0), {}, False),
    "dpo_sdpo": ("dpo", dict(beta=20.0), dict(safeguard="sdpo", safeguard_hparams=(("mu", 0.5), ("max_lambda", 1.0))),
                 False),
    "sft_min_snr": ("sft", {}, dict(min_snr_gamma=1.0), False),
}
# Per-pair objectives: accumulating micro-batches is the large batch. The others take a statistic of the
# whole micro-batch (KTO's z0, the sdxl form's switch, SDPO's lambda), as their sources do per micro-batch.
PER_PAIR = ("dpo_hinge", "dpo_ipo", "dmpo", "dspo_sd15", "smpo", "sft_min_snr")


def setup(case, mesh_shape=(1, 1, 1), accum=1, lr=1e-2, eps=1e-8, ema_decay=None):
  name, hp, extra, _ = CASES[case]
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  opt_cfg = optim.default_config()
  opt_cfg.lr, opt_cfg.eps = lr, eps
  tx = optim.make_optimizer(opt_cfg)
  graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(TinyDenoiser(), tx, mesh, seed=0,
                                                                      ema=ema_decay is not None)
  obj = objectives.get_objective(name)
  cfg = StepConfig(objective=name, hparams=dict(obj.hparams(num_timesteps=1000), **hp), latents=LATENTS,
                   accum_steps=accum, ema_decay=ema_decay, **extra)
  ref = ref_sh = None
  if obj.needs_reference:  # a reference that differs from the policy, so every term is non-trivial
    ref_sh = state_sh.params
    ref = jax.device_put(nnx.to_pure_dict(nnx.state(TinyDenoiser(seed=1), nnx.Param)), ref_sh)
  step = jit_train_step(make_train_step(denoise, graphdef, graphdef, tx, SCHEDULE, cfg, mesh), state_sh, mesh,
                        Frozen(policy=frozen_sh, reference=ref_sh))
  return mesh, graphdef, state, state_sh, step, Frozen(policy=frozen, reference=ref), cfg


def global_batch(batch, mesh):
  return jax.device_put(batch, sharding.batch_sharding(mesh))


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_on_a_fixed_batch(case):
  mesh, graphdef, state, _, step, frozen, cfg = setup(case)
  batch = global_batch(make_batch(unpaired=CASES[case][3]), mesh)
  loss_fn = jax.jit(make_loss_fn(denoise, graphdef, graphdef, SCHEDULE, cfg))

  def eval_loss(params):  # the same 4 noise draws before and after
    return np.mean([float(loss_fn(params, frozen, batch, draw_noise(jax.random.key(k), batch, 1000))[0])
                    for k in range(4)])

  before = eval_loss(state.params)
  for _ in range(40):
    state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"]))
  after = eval_loss(state.params)
  assert after < 0.9 * before, (before, after)
  assert int(state.skipped) == 0


def one_step(case, mesh_shape, accum=1):
  # eps = 1e-3: Adam's first update g / (|g| + eps) stays smooth in g (tests/test_train_step.py).
  mesh, _, state, _, step, frozen, _ = setup(case, mesh_shape, accum, eps=1e-3)
  state, metrics = step(state, global_batch(make_batch(unpaired=CASES[case][3]), mesh), frozen)
  return state, metrics


# float32 per-sample statistics (means of 256 products) summed in another order (another mesh or fusion)
# agree to a few ulps: at most ERR_RTOL = 2^-20 (16 ulps) relative to the largest of them.
ERR_RTOL = 2.0 ** -20


def loss_bound(case):
  """How far the loss can move when each per-sample statistic moves by ERR_RTOL * max|statistic|: the L1
  norm of the objective's gradient with respect to its statistics, at the first step's single-device
  statistics, times that displacement (as tests/test_train_step.py `loss_bound`)."""
  name, hp, _, unpaired = CASES[case]
  mesh, graphdef, state, _, _, frozen, cfg = setup(case)
  batch = make_batch(unpaired=unpaired)
  obj = objectives.get_objective(name)
  keys = branches(batch, obj)
  draws = draw_noise(jax.random.fold_in(jax.random.key(0), 0), batch, 1000)
  run = lambda params, p: predictions(denoise, nnx.merge(graphdef, params, p), batch, draws, SCHEDULE, LATENTS, keys)
  pred, target = run(state.params, frozen.policy)
  ref_pred = run(frozen.reference, frozen.policy)[0] if obj.needs_reference else None
  stats = per_sample_statistics(pred, target, ref_pred, keys)
  if obj.unpaired:
    stats = dict(stats, label=batch["label"]) if "label" in batch else pairs_as_unpaired(stats)
  inputs = dict(stats, **{k: batch.get(k) for k in ("score_w", "score_l")})
  floats = {k: inputs[k] for k in obj.inputs if k not in ("label", "score_w", "score_l")}
  grads = jax.grad(lambda f: objectives.call_objective(name, dict(inputs, **f), cfg.hparams)[0])(floats)
  sensitivity = sum(float(jnp.sum(jnp.abs(g))) for g in grads.values())
  return sensitivity * ERR_RTOL * max(float(jnp.max(jnp.abs(v))) for v in floats.values())


def assert_same_step(state, metrics, ref_state, ref_metrics, bound):
  """Same loss (within `bound` plus float32 rounding of the loss itself), gradient norm and parameters
  (1e-5 relative plus the bound, whose relative size carries over to the per-sample gradient weights)."""
  loss, ref_loss = float(metrics["loss"]), float(ref_metrics["loss"])
  assert abs(loss - ref_loss) <= bound + 1e-6 * abs(ref_loss), (loss, ref_loss, bound)
  rel = bound / max(abs(ref_loss), 1e-30)
  assert rel_l2(metrics["grad_norm"], ref_metrics["grad_norm"]) <= 1e-5 + rel
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    assert rel_l2(a, b) <= 1e-4 + rel


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_step_equals_single_device(case):
  ref_state, ref_metrics = one_step(case, (1, 1, 1))
  bound = loss_bound(case)
  # One mesh with every axis > 1: the batch split over data x fsdp, the weights over fsdp x tensor.
  state, metrics = one_step(case, (1, 4, 2))
  assert_same_step(state, metrics, ref_state, ref_metrics, bound)
  assert state.params["w_in"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert state.params["w_in"].addressable_shards[0].data.size < state.params["w_in"].size


@pytest.mark.parametrize("case", PER_PAIR)
def test_accumulation_equals_the_large_batch(case):
  big_state, big_metrics = one_step(case, (2, 1, 1), accum=1)
  acc_state, acc_metrics = one_step(case, (2, 1, 1), accum=2)
  assert_same_step(acc_state, acc_metrics, big_state, big_metrics, loss_bound(case))


# ---------------------------------------------------------------- the SDPO safeguard in the step
def loss_and_grads(case, batch, **extra):
  _, graphdef, state, _, _, frozen, cfg = setup(case)
  cfg = StepConfig(**{**cfg.__dict__, **extra})
  loss_fn = make_loss_fn(denoise, graphdef, graphdef, SCHEDULE, cfg)
  draws = draw_noise(jax.random.key(3), batch, 1000)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, frozen, batch, draws)


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_sdpo_safeguard_scales_an_aligned_losers_gradient():
  # Loser latents equal to the winners' (posterior std ~3e-7): the residuals align, <dB, dA> ~ ||dA||^2,
  # so lambda = 1 - mu. Unguarded DPO's gradient then nearly cancels (dL/dl_l = -dL/dl_w on the same
  # errors); guarded, it is mu times the winner-only gradient (lambda = 0 at mu = 1).
  batch = make_batch()
  batch["moments_w"][..., C:] = -60.0
  batch["moments_l"] = batch["moments_w"].copy()
  (plain_loss, _), plain = loss_and_grads("dpo_sdpo", batch, safeguard="")
  guarded = {}
  for mu in (0.5, 1.0):
    (loss, metrics), guarded[mu] = loss_and_grads("dpo_sdpo", batch, safeguard_hparams=(("mu", mu),))
    np.testing.assert_allclose(float(metrics["loser_scale"]), 1.0 - mu, atol=1e-5)
    assert float(loss) == float(plain_loss)  # the forward value is untouched
  winner_only = flat(guarded[1.0])
  assert np.linalg.norm(flat(plain)) < 1e-3 * np.linalg.norm(winner_only)
  np.testing.assert_allclose(flat(guarded[0.5]), 0.5 * winner_only, rtol=0, atol=1e-3 * np.abs(winner_only).max())


def test_sdpo_safeguard_with_room_leaves_the_gradient_alone():
  # mu = 0 and <dB, dA> <= ||dA||^2 (here: the loser's residual no larger than the winner's, Cauchy-Schwarz):
  # lambda = min(1, ||dA||^2 / <dB, dA>) = max_lambda = 1, exactly the unguarded gradient.
  batch = make_batch()
  batch["moments_w"], batch["moments_l"] = batch["moments_l"], batch["moments_w"]  # larger winners
  (_, _), plain = loss_and_grads("dpo_sdpo", batch, safeguard="")
  (_, metrics), grads = loss_and_grads("dpo_sdpo", batch, safeguard_hparams=(("mu", 0.0),))
  assert float(metrics["loser_scale"]) == 1.0
  np.testing.assert_array_equal(flat(grads), flat(plain))


# ---------------------------------------------------------------- min-SNR-gamma
def test_min_snr_weights_match_diffusers_formula():
  t = jnp.array([0, 10, 250, 500, 999])
  # The schedule's float32 alphas_cumprod, in float64: 1 - a is exact in float32 too (a in [1/2, 1], or
  # far from 1), so the weights agree to a few ulps.
  ac = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = ac / (1 - ac)  # diffusers.training_utils.compute_snr: (sqrt(a) / sqrt(1 - a))^2
  for gamma in (1.0, 5.0):
    np.testing.assert_allclose(min_snr_weights(SCHEDULE, t, gamma), np.minimum(snr, gamma) / snr, rtol=1e-6)
  import dataclasses
  v_schedule = dataclasses.replace(SCHEDULE, prediction_type="v_prediction")
  np.testing.assert_allclose(min_snr_weights(v_schedule, t, 5.0), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)
  assert float(min_snr_weights(SCHEDULE, jnp.array([999]), 1.0)[0]) == 1.0  # SNR < gamma: weight 1


def test_min_snr_weights_the_per_sample_errors_in_the_step():
  batch = make_batch()
  (loss, _), _ = loss_and_grads("sft_min_snr", batch)
  (plain, metrics), _ = loss_and_grads("sft_min_snr", batch, min_snr_gamma=0.0)
  _, graphdef, state, _, _, frozen, cfg = setup("sft_min_snr")
  draws = draw_noise(jax.random.key(3), batch, 1000)
  err_w, _ = jax.jit(lambda p: per_sample_errors(denoise, nnx.merge(graphdef, p, frozen.policy), batch, draws,
                                                 SCHEDULE, LATENTS, False))(state.params)
  w = np.asarray(min_snr_weights(SCHEDULE, draws["t"], 1.0), np.float64)
  np.testing.assert_allclose(float(loss), (w * np.asarray(err_w, np.float64)).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(plain), np.asarray(err_w, np.float64).mean(), rtol=1e-6)
  assert (w < 1).any() and float(loss) < float(plain)


# ---------------------------------------------------------------- EMA
def test_ema_with_decay_zero_is_the_raw_weights_and_decay_half_averages():
  mesh, _, state0, _, step, frozen, _ = setup("dmpo", (1, 4, 2), ema_decay=0.0)
  batch = global_batch(make_batch(), mesh)
  state = state0
  for _ in range(3):
    state, _ = step(state, batch, frozen)
    for e, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(np.asarray(e), np.asarray(p))
      assert e.sharding == p.sharding
  mesh, _, state, _, step, frozen, _ = setup("dmpo", (1, 4, 2), ema_decay=0.5)
  start = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, batch, frozen)
  p1 = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, batch, frozen)
  expected = jax.tree.map(lambda a, b, c: 0.5 * (0.5 * a + 0.5 * b) + 0.5 * c, start, p1,
                          jax.tree.map(np.asarray, state.params))
  for e, x in zip(jax.tree.leaves(state.ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(e), x, rtol=1e-6, atol=1e-7)


def test_resumed_ema_is_bit_identical(tmp_path):
  mesh, _, state, state_sh, step, frozen, _ = setup("kto_unpaired", (1, 4, 2), ema_decay=0.9)
  batch = global_batch(make_batch(unpaired=True), mesh)
  for _ in range(2):
    state, _ = step(state, batch, frozen)
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(2, state)
  checkpointer.wait()
  restored = checkpointer.restore(2, abstract_like(state, state_sh))
  ema_only = checkpointer.restore_params(2, abstract_like(state.ema, state_sh.ema), item="ema")
  checkpointer.close()
  for a, b, c in zip(jax.tree.leaves(restored.ema), jax.tree.leaves(state.ema), jax.tree.leaves(ema_only)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
  for _ in range(2):  # both continue: bit-identical states
    state, _ = step(state, batch, frozen)
    restored, _ = step(restored, batch, frozen)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(state.ema["w_in"]), np.asarray(state.params["w_in"]))


def test_a_checkpoint_without_ema_says_so(tmp_path):
  mesh, _, state, state_sh, _, _, _ = setup("dmpo")
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(0, state)
  checkpointer.wait()
  with pytest.raises(FileNotFoundError, match="no 'ema' item.*ema_decay"):
    checkpointer.restore_params(0, abstract_like(state.params, state_sh.params), item="ema")
  checkpointer.close()


def test_turning_ema_on_at_resume_is_refused_without_moving_the_checkpoint(tmp_path):
  _, _, state, state_sh, _, _, _ = setup("dmpo")
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(0, state)
  checkpointer.wait()
  _, _, with_ema, with_ema_sh, _, _, _ = setup("dmpo", ema_decay=0.5)
  with pytest.raises(ValueError, match="holds no EMA.*ema_decay=-1"):
    checkpointer.restore_latest(abstract_like(with_ema, with_ema_sh))
  assert checkpointer.all_steps() == [0]
  checkpointer.close()


# ---------------------------------------------------------------- DPO at step 0 in the recipes' bf16 (issue 25)
U_BF16 = 2.0 ** -8  # bfloat16's unit roundoff: round to nearest with 8 significant bits, |x - bf16(x)| <= 2^-8 |x|
STEP0_PAIRS = 16


def toy_pairs(pipe, pairs, seed=0):
  """Random pairs in the toy base's shapes (32 px: 8 x 8 x 4 latents; CLIP widths 24 and 16)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  logvar = np.full((pairs, 8, 8, 4), -8.0, np.float32)
  moments = lambda: np.concatenate([f(pairs, 8, 8, 4) / pipe.latents.scale, logvar], -1)  # unit-variance latents
  time_ids = np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (pairs, 1))
  return dict(moments_w=moments(), moments_l=moments(), prompt_embeds=f(pairs, 77, 24),
              pooled_prompt_embeds=f(pairs, 16), time_ids=time_ids)


def torch_dpo_step0(base, z, noise, t, cond, beta):
  """SalesforceAIResearch/DiffusionDPO train.py's first step on these inputs (stacked winners first) with
  `--mixed_precision bf16`: the policy in float32 under autocast, the reference UNet cast to bf16
  (`ref_unet.to(weight_dtype)`), latents, noise and conditioning in bf16 (weight_dtype), the policy's output
  converted to float32 (accelerate), the reference's errors computed in bf16. Returns its per-pair inside and,
  for the bound, the same UNet's float32 prediction on the float32 inputs."""
  import copy
  import torch
  from diffusers import DDPMScheduler, UNet2DConditionModel
  unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32).eval()
  ref = copy.deepcopy(unet).to(torch.bfloat16)
  sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")  # train.py's noise_scheduler
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
  t = torch.from_numpy(np.asarray(t)).long()

  def inputs(dtype):
    eps = nchw(noise).to(dtype)
    added = {"text_embeds": torch.from_numpy(cond["pooled_prompt_embeds"]).to(dtype),
             "time_ids": torch.from_numpy(cond["time_ids"]).to(dtype)}
    noisy = sched.add_noise(nchw(z).to(dtype), eps, t)
    return eps, (noisy, t, torch.from_numpy(cond["prompt_embeds"]).to(dtype)), added

  with torch.no_grad():
    eps, args, added = inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
      model_pred = unet(*args, added_cond_kwargs=added).sample
    model_losses = (model_pred.float() - eps).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    ref_losses = (ref(*args, added_cond_kwargs=added).sample - eps).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    inside = -0.5 * beta * ((model_losses[0] - model_losses[1]) - (ref_losses[0] - ref_losses[1]))
    eps32, args32, added32 = inputs(torch.float32)
    v = unet(*args32, added_cond_kwargs=added32).sample
  return inside.double().numpy(), v.double().numpy(), eps32.double().numpy()


def test_dpo_margin_at_step_0_in_bf16_is_below_rounding_level():
  """At policy = reference every DPO inside term is 0; in bf16 it is what the two forwards' rounding leaves, times
  beta/2. The bound (docs/objectives.md, "DPO at step 0 in bf16") is what two forwards would leave that agree but
  for one independent round-to-nearest of every output element: p = v + d, q = v + d', with d, d' uniform within
  half an ulp of v, |d| <= h = u 2^floor(log2 |v|), u = 2^-8 (variance h^2 / 3 each). Per sample they differ by
  dl = mean_N [(p - t)^2 - (q - t)^2] ~ mean_N 2 r (d - d') (r = v - t), of variance 8 / (3 N^2) sum_N r^2 h^2, N =
  H W C the number of elements the error averages; |inside_i| = beta/2 |dl_w - dl_l| (Gaussian by the central
  limit theorem) then has mean sqrt(2/pi) beta/2 sqrt(var_w + var_l). The recipes' step (config defaults: bf16
  compute on float32 master weights, reference stored in bf16, remat) on the shipped fp16 toy base must stay below
  that on average over the pairs, and below the official PyTorch step on the same inputs (which rounds the
  reference's errors themselves to bf16)."""
  from mapo_jax import config as config_lib
  from mapo_jax.pipelines import load_pipeline
  from mapo_jax.toy.demo import BASE
  from mapo_jax.training.build import build, denoiser_param_dtype, model_options

  config = config_lib.base_config()
  config.objective, config.global_batch_size, config.accum_steps, config.mesh = "dpo", 1, 1, (1, 1, 1)
  assert (config.dtype, config.ref_param_dtype) == ("bfloat16", "bfloat16")  # the recipes' numerics
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  options = model_options(config, mesh)
  model = sd.load_denoiser(BASE, param_dtype=denoiser_param_dtype(config), mesh=mesh, **options)
  reference = sd.load_denoiser(BASE, param_dtype=jnp.dtype(config.ref_param_dtype), mesh=mesh, **options)
  pipe = load_pipeline(BASE, ("scheduler", "vae"))
  built = build(config, sd, model, reference, pipe.schedule, pipe.latents, mesh)
  beta = float(config.dpo.beta)
  batch = toy_pairs(pipe, STEP0_PAIRS)
  # One pair per step, so a step's `margin` is that pair's inside term; every step starts from the initial state
  # with its own key (its own noise and timestep), drawn here again for the PyTorch step.
  inside, z, noise, t = [], [], [], []
  for i in range(STEP0_PAIRS):
    pair = {k: v[i:i + 1] for k, v in batch.items()}
    key = jax.random.key(100 + i)
    draws = draw_noise(jax.random.fold_in(key, 0), pair, pipe.schedule.num_train_timesteps)  # the step's key
    rng = jax.device_put(jnp.copy(jax.random.key_data(key)), sharding.replicated(mesh))  # the step donates it
    _, metrics = built.train_step(jax.tree.map(jnp.copy, built.state).replace(rng=rng), global_batch(pair, mesh),
                                  built.frozen)
    inside.append(float(metrics["margin"]))
    z.append(np.asarray(training_latents(pair, draws, pipe.latents, LATENT_KEYS)))
    noise.append(np.asarray(draws["noise"]))
    t.append(np.asarray(draws["t"]))
  inside = np.asarray(inside)
  z = np.concatenate([x[:1] for x in z] + [x[1:] for x in z])  # winners first, as the step stacks them
  twice = lambda x: np.concatenate([x, x])
  cond = {k: twice(batch[k]) for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}
  official, v, target = torch_dpo_step0(BASE, z, twice(np.concatenate(noise)), twice(np.concatenate(t)), cond, beta)

  n = v[0].size
  h = U_BF16 * np.exp2(np.frexp(v)[1] - 1.0)  # half an ulp of each output element in bf16
  var = 8 / (3 * n ** 2) * np.sum(((v - target) * h) ** 2, axis=(1, 2, 3))  # of each sample's dl
  bound = np.mean(np.sqrt(2 / np.pi) * beta / 2 * np.sqrt(var[:STEP0_PAIRS] + var[STEP0_PAIRS:]))
  ours, theirs = np.abs(inside).mean(), np.abs(official).mean()
  print(f"mean |inside| at step 0: ours {ours:.4g}, bound {bound:.4g}, official step {theirs:.4g}")
  assert ours <= bound, (ours, bound, theirs)
  assert ours <= theirs, (ours, theirs)
