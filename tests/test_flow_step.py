"""The train step on flow-matching models (FLUX.1, SD3 / SD3.5), against PyTorch steps written from the sources.

What the step must do on a FlowMatchEulerDiscreteScheduler pipeline (docs/objectives.md, "Flow matching"), as
diffusers' examples/dreambooth/train_dreambooth_lora_flux.py and train_dreambooth_lora_sd3.py do it:
u from `compute_density_for_timestep_sampling` (weighting_scheme, logit_mean, logit_std, mode_scale), the timestep
`noise_scheduler.timesteps[(u * T).long()]` and its sigma (`get_sigmas`), x_t = (1 - sigma) x0 + sigma noise,
the velocity target noise - x0, per-sample losses mean((weighting * (pred - target)^2)) with
`compute_loss_weighting_for_sd3`; FLUX.1-dev called at timestep / 1000 with the embedded guidance scale
(`--guidance_scale`) on 2x2-packed latents. One noise draw and one sigma per pair, shared by winner and loser (the
official Diffusion-DPO trainer's convention, kept by every published flow-model DPO: flow_grpo
scripts/train_sd3_dpo.py, Linear-DPO train/train_sd3_dpo.py, Follow-Your-Preference scripts/train_flux_dpo.py).
The objectives are the official formulas: MaPO (mapo-t2i/mapo utils.py `compute_loss`) and Diffusion-DPO
(SalesforceAIResearch/DiffusionDPO train.py: -log sigmoid(-beta/2 ((l_w - l_l) - (r_w - r_l)))).

1. One MaPO and one DPO step on a tiny FLUX transformer, and one MaPO step with cosmap weighting on a tiny SD3.5
   transformer, equal the PyTorch step (diffusers' transformers with the same weights): loss, gradient of every
   parameter, and the SGD update. Tolerances from the arithmetic: both forwards agree to F32_TOL (asserted), which
   bounds how far each per-sample error can move, and the objective's first and second derivatives carry that to
   the loss and to each sample's weight in the gradient; each sample's gradient agrees to F32_TOL
   (tests/test_flux_transformer.py's bar for gradients).
2. A (1, 4, 2) mesh equals one device; two accumulated micro-batches equal the big batch (both per-pair
   objectives), within tests/test_train_step.py's float32-reordering bound.
3. Every objective (and the SDPO safeguard) sees the hand-computed weighted velocity errors (a tiny stand-in
   denoiser); min-SNR is refused on a flow schedule.
4. The step's sigmas follow each density's closed form (Kolmogorov-Smirnov at a fixed seed), its weights equal
   diffusers', the config keys of the other schedule kind fail naming the key, and the flow recipes validate and
   match their sourced tables.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import rel_l2
from flax import nnx
from flow_fixtures import make_diffusers_flux_transformer, make_diffusers_sd3_transformer

from mapo_jax import config as config_lib
from mapo_jax import diffusion, sharding
from mapo_jax.convert.params import state_dict
from mapo_jax.models.presets import TINY_FLUX_TRANSFORMER, TINY_SD35_TRANSFORMER
from mapo_jax.pipelines import flux, sd, sd3
from mapo_jax.training import objectives
from mapo_jax.training.build import step_config
from mapo_jax.training.train_step import (LATENT_KEYS, Frozen, StepConfig, branches, create_sharded_state, draw_noise,
                                          jit_train_step, make_loss_fn, make_train_step, pairs_as_unpaired,
                                          per_sample_statistics, predictions, prepare_batch, step_compiler_options,
                                          training_latents)

F32_TOL = 1e-4  # float32 forward passes and gradients of the tiny transformers: the project's bar
ERR_RTOL = 2.0 ** -20  # one float32 computation of the per-sample errors in another order (tests/test_train_step.py)
PAIRS, H, W, TOKENS = 4, 4, 6, 5  # non-square latents: FLUX packs 2 x 3 tokens, SD3 patches 2 x 3
LR = 1e-2  # the SGD step whose update is compared


@dataclasses.dataclass(frozen=True)
class Family:
  module: object
  config: dict
  make: object
  scheduler: dict
  channels: int  # VAE latent channels (FLUX packs 4 of them per token)
  text: int  # joint_attention_dim
  pooled: int


FAMILIES = {
    "flux": Family(flux, TINY_FLUX_TRANSFORMER, make_diffusers_flux_transformer, flux.SCHEDULER_CONFIG,
                   TINY_FLUX_TRANSFORMER["in_channels"] // 4, TINY_FLUX_TRANSFORMER["joint_attention_dim"],
                   TINY_FLUX_TRANSFORMER["pooled_projection_dim"]),
    "sd3": Family(sd3, TINY_SD35_TRANSFORMER, make_diffusers_sd3_transformer, sd3.SCHEDULER_CONFIG,
                  TINY_SD35_TRANSFORMER["in_channels"], TINY_SD35_TRANSFORMER["joint_attention_dim"],
                  TINY_SD35_TRANSFORMER["pooled_projection_dim"]),
}

# name -> (family, objective, config overrides). The tiny models' winner and loser errors differ by O(0.1), not by
# a trained model's O(1e-3), so DPO's beta and MaPO's T are lowered to keep the sigmoids away from saturation (as
# tests/test_objectives_step.py lowers the betas). MaPO keeps snr 0.5: a small snr instead would make the official
# formula s l / (exp(s l) - 1) cancel in float32. Weighting and guidance are non-default where they matter.
CASES = {
    "flux_mapo": ("flux", "mapo", {"flow.weighting_scheme": "logit_normal", "flow.logit_mean": 0.3,
                                   "flow.logit_std": 1.2}),
    "flux_dpo": ("flux", "dpo", {"dpo.beta": 10.0, "flow.weighting_scheme": "mode", "flow.guidance": 2.0}),
    "sd3_mapo": ("sd3", "mapo", {"flow.weighting_scheme": "cosmap"}),
}
MAPO_T = 20  # MaPO's T in these tests (the step's is the schedule's num_train_timesteps, checked in `setup`)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(family, seed) -> a saved diffusers transformer folder and the torch model: seed 0 the policy, 1 DPO's
  reference (another model, so every term of the objective is non-trivial)."""
  cache = {}

  def get(name, seed):
    if (name, seed) not in cache:
      path = tmp_path_factory.mktemp(f"{name}_{seed}")
      cache[name, seed] = path, FAMILIES[name].make(FAMILIES[name].config, path, seed=seed, scale=0.1)
    return cache[name, seed]

  return get


def make_batch(fam: Family, seed=0):
  """Pairs of VAE posterior moments whose normalised samples have about unit variance, text and pooled embeddings,
  and the six time ids every cache row holds (unused by both families)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  latents = fam.module.preset_latents(fam.config)
  moments = lambda: np.concatenate([latents.shift + f(PAIRS, H, W, fam.channels) / latents.scale,
                                    f(PAIRS, H, W, fam.channels) - 3.0], -1)
  return dict(moments_w=moments(), moments_l=moments(), prompt_embeds=f(PAIRS, TOKENS, fam.text),
              pooled_prompt_embeds=f(PAIRS, fam.pooled), time_ids=np.tile(np.float32([[32, 48, 0, 0, 32, 48]]),
                                                                          (PAIRS, 1)))


def case_config(case):
  name, objective, overrides = CASES[case]
  config = config_lib.base_config()
  config.objective = objective
  config.ref_param_dtype = "float32"  # float32 numerics throughout: the models load in float32 here
  for key, value in overrides.items():
    block, leaf = key.split(".")
    config[block][leaf] = value
  return config


def record_gradient():
  """An optax stage that keeps the step's gradient as its state (and passes it on), so the test reads the exact
  gradient instead of differencing parameters."""
  return optax.GradientTransformation(init=lambda params: jax.tree.map(jnp.zeros_like, params),
                                      update=lambda updates, state, params=None: (updates, updates))


@functools.cache
def schedule_of(name):
  return diffusion.as_schedule(FAMILIES[name].scheduler)


def setup(folders, case, mesh_shape=(1, 1, 1), accum=1):
  """The step of `case` as build.py makes it (StepConfig from the config by `step_config`), with an optimizer that
  records the gradient and then takes an SGD step."""
  name, objective, _ = CASES[case]
  fam = FAMILIES[name]
  config = case_config(case)
  config.accum_steps = accum
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape)])
  latents = fam.module.preset_latents(fam.config)
  cfg = step_config(config, fam.module, latents, schedule_of(name))
  if objective == "mapo":
    assert cfg.hparams["num_timesteps"] == schedule_of(name).num_train_timesteps == 1000
    cfg = dataclasses.replace(cfg, hparams=dict(cfg.hparams, num_timesteps=MAPO_T))
  tx = optax.chain(record_gradient(), optax.sgd(LR))
  model = fam.module.load_denoiser(folders(name, 0)[0], mesh=mesh)
  graphdef, state, state_sh, frozen, frozen_sh = create_sharded_state(model, tx, mesh, seed=0)
  ref_graphdef = ref = ref_sh = None
  if objectives.get_objective(objective).needs_reference:
    reference = fam.module.load_denoiser(folders(name, 1)[0], mesh=mesh)
    ref_graphdef = nnx.graphdef(reference)
    ref, ref_sh = sharding.place(reference, mesh, ...)  # every variable, as build.py places it
  step = jit_train_step(make_train_step(fam.module.denoise, graphdef, ref_graphdef, tx, schedule_of(name), cfg, mesh),
                        state_sh, mesh, Frozen(policy=frozen_sh, reference=ref_sh), step_compiler_options(cfg, mesh))
  return dict(mesh=mesh, graphdef=graphdef, ref_graphdef=ref_graphdef, state=state, frozen=Frozen(frozen, ref),
              step=step, cfg=cfg, fam=fam, name=name)


@dataclasses.dataclass
class Step:
  metrics: dict  # the step's metrics (loss, ...)
  grads: dict  # the step's gradient, by PyTorch parameter name
  params: dict  # the parameters after the SGD update, by PyTorch parameter name
  cfg: object  # its StepConfig
  mesh_shape: tuple


@pytest.fixture(scope="module")
def steps(folders):
  """(case, mesh shape, accum_steps) -> the first Step from the initial state, each run once."""
  cache = {}

  def get(case, mesh_shape=(1, 1, 1), accum=1):
    if (case, mesh_shape, accum) not in cache:
      s = setup(folders, case, mesh_shape, accum)
      batch = jax.device_put(make_batch(s["fam"]), sharding.batch_sharding(s["mesh"]))
      state, metrics = s["step"](s["state"], batch, s["frozen"])
      keyed = lambda tree: state_dict(nnx.merge(s["graphdef"], tree, s["frozen"].policy))
      cache[case, mesh_shape, accum] = Step(jax.device_get(metrics), keyed(state.opt_state[0]), keyed(state.params),
                                            s["cfg"], mesh_shape)
    return cache[case, mesh_shape, accum]

  return get


# ------------------------------------------------------------------------------------------------ the PyTorch step
def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def torch_prediction(name, model, noisy, timesteps, batch, guidance):
  """The transformer called as the training scripts call it, on NCHW latents of 2B samples."""
  twice = lambda k: torch.from_numpy(np.concatenate([batch[k], batch[k]]))
  if name == "sd3":  # train_dreambooth_lora_sd3.py: timestep = the scheduler's timesteps (sigma * 1000)
    return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=twice("prompt_embeds"),
                 pooled_projections=twice("pooled_prompt_embeds"), return_dict=False)[0]
  from diffusers import FluxPipeline
  n, c, h, w = noisy.shape
  packed = FluxPipeline._pack_latents(noisy, batch_size=n, num_channels_latents=c, height=h, width=w)
  img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
  out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([guidance]).expand(n),
              pooled_projections=twice("pooled_prompt_embeds"), encoder_hidden_states=twice("prompt_embeds"),
              txt_ids=torch.zeros(TOKENS, 3), img_ids=img_ids, return_dict=False)[0]
  return FluxPipeline._unpack_latents(out, height=h * 8, width=w * 8, vae_scale_factor=8)


def torch_losses(name, model, batch, draws, u, scheme, guidance):
  """Per-sample weighted velocity errors [winners; losers] (2B,) as train_dreambooth_lora_{flux,sd3}.py computes
  them, and the prediction. The posterior samples are DiagonalGaussianDistribution.sample with our eps."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.training_utils import compute_loss_weighting_for_sd3
  fam = FAMILIES[name]
  latents = fam.module.preset_latents(fam.config)
  scheduler = FlowMatchEulerDiscreteScheduler.from_config(fam.scheduler)

  def model_input(moments, eps):
    mean, logvar = torch.chunk(nchw(batch[moments]), 2, dim=1)
    sample = mean + torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0)) * nchw(draws[eps])
    return (sample - latents.shift) * latents.scale

  x0 = torch.cat([model_input("moments_w", "eps_w"), model_input("moments_l", "eps_l")])
  noise = nchw(draws["noise"]).repeat(2, 1, 1, 1)  # one noise per pair, shared by winner and loser
  indices = (torch.from_numpy(np.array(u)) * scheduler.config.num_train_timesteps).long()
  timesteps = scheduler.timesteps[indices].repeat(2)
  step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]  # the scripts' get_sigmas
  sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
  noisy = (1.0 - sigmas) * x0 + sigmas * noise
  pred = torch_prediction(name, model, noisy, timesteps, batch, guidance)
  target = noise - x0
  weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
  losses = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
  return losses, pred


def torch_objective(objective, hp, num_timesteps, e, r=None):
  """The official losses on per-sample errors [w; l] (and the reference's)."""
  e_w, e_l = e.chunk(2)
  if objective == "mapo":  # mapo-t2i/mapo utils.py compute_loss
    g = lambda l: hp["snr"] * l / (torch.exp(hp["snr"] * l) - 1)
    ratio = torch.nn.functional.logsigmoid((g(e_w) - g(e_l)) * num_timesteps)
    return e_w.mean() - (hp["beta"] * ratio).mean()
  r_w, r_l = r.chunk(2)  # SalesforceAIResearch/DiffusionDPO train.py
  inside = -0.5 * hp["beta"] * ((e_w - e_l) - (r_w - r_l))
  return -torch.nn.functional.logsigmoid(inside).mean()


def sample_gradients(model, losses):
  """Each sample's gradient of its loss, by parameter name: the scale of what the objective sums."""
  names, params = zip(*model.named_parameters())
  out = []
  for i in range(losses.shape[0]):
    grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
    out.append({n: np.zeros(p.shape, np.float32) if g is None else g.numpy() for n, g, p in zip(names, grads, params)})
  return out


def our_prediction(folders, name, batch, draws, cfg, seed=0):
  """Our denoiser's prediction on the step's draws (NHWC, [winners; losers]), from the saved folder."""
  fam = FAMILIES[name]
  graphdef, state = nnx.split(fam.module.load_denoiser(folders(name, seed)[0]))

  @jax.jit
  def run(state, batch, draws):
    return predictions(fam.module.denoise, nnx.merge(graphdef, state), batch, draws, schedule_of(name), cfg.latents,
                       LATENT_KEYS)[0]

  return np.asarray(run(state, batch, draws))


@dataclasses.dataclass
class TorchStep:
  loss: float
  grads: dict  # by parameter name
  params_before: dict
  sample_grad_norms: dict  # parameter name -> (2B,) norms of each sample's gradient of its weighted error
  inputs: dict  # the objective's inputs: "e" (2B,) weighted errors [w; l], and "r" the reference's for DPO
  predictions: dict  # "e" / "r" -> (ours, diffusers') NHWC predictions on the same draws
  draws: dict
  u: np.ndarray


@pytest.fixture(scope="module")
def torch_steps(folders, steps):
  """case -> the PyTorch step on the first step's draws (module docstring), with our predictions beside it."""
  cache = {}

  def get(case):
    if case in cache:
      return cache[case]
    name, objective, _ = CASES[case]
    fam, schedule = FAMILIES[name], schedule_of(name)
    cfg = steps(case).cfg
    flow = cfg.flow
    batch = make_batch(fam)
    prepared = jax.device_get(prepare_batch(batch, cfg))
    # The step's draws: its key is fold_in(key(seed), step); its sigmas come from u drawn with the last split key.
    key = jax.random.fold_in(jax.random.key(0), 0)
    draws = jax.device_get(draw_noise(key, batch, schedule, flow))
    u = np.array(diffusion.flow_density(jax.random.split(key, 4)[3], PAIRS, flow.weighting_scheme,
                                        logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                                        mode_scale=flow.mode_scale))
    np.testing.assert_array_equal(np.asarray(diffusion.flow_lookup(schedule, u)[0]), draws["sigma"])

    model = folders(name, 0)[1]
    model.zero_grad(set_to_none=True)
    e, pred = torch_losses(name, model, batch, draws, u, flow.weighting_scheme, cfg.guidance)
    nhwc = lambda x: x.detach().permute(0, 2, 3, 1).numpy()
    inputs = {"e": e.detach().numpy().copy()}
    predictions_ = {"e": (our_prediction(folders, name, prepared, draws, cfg), nhwc(pred))}
    r = None
    if objective == "dpo":
      with torch.no_grad():
        r, ref_pred = torch_losses(name, folders(name, 1)[1], batch, draws, u, flow.weighting_scheme, cfg.guidance)
      inputs["r"] = r.numpy().copy()
      predictions_["r"] = (our_prediction(folders, name, prepared, draws, cfg, seed=1), nhwc(ref_pred))
    loss = torch_objective(objective, cfg.hparams, cfg.hparams.get("num_timesteps"), e, r)
    per_sample = sample_gradients(model, e)
    loss.backward()
    named = dict(model.named_parameters())
    cache[case] = TorchStep(
        float(loss.detach()), {n: p.grad.numpy().copy() for n, p in named.items()},
        {n: p.detach().numpy().copy() for n, p in named.items()},
        {n: np.array([np.linalg.norm(g[n]) for g in per_sample], np.float64) for n in named},
        inputs, predictions_, draws, u)
    return cache[case]

  return get


def derivatives(case, hp, inputs):
  """Our objective's gradient and Hessian with respect to its inputs ("e", and "r" for DPO) at the step's
  hyper-parameters `hp`, as float64 numpy."""
  _, objective, _ = CASES[case]

  def fn(x):
    stats = dict(err_w=x["e"][:PAIRS], err_l=x["e"][PAIRS:])
    if "r" in x:
      stats.update(ref_err_w=x["r"][:PAIRS], ref_err_l=x["r"][PAIRS:])
    return objectives.call_objective(objective, stats, hp)[0]

  first = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.grad(fn)(inputs))
  second = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.hessian(fn)(inputs))
  return first, second


def assert_gradients_within(grads, ref, t: TorchStep, first, second, moves, sample_rtol, tag):
  """Per parameter |g - g'| <= sum_i (dc_i + sample_rtol |c_i|) |grad e_i|: sample i enters the gradient with weight
  c_i = dL/de_i, which moves by at most dc_i = sum_j |d2L/de_i dx_j| moves_j when the inputs move by `moves`, and
  its own gradient moves by at most sample_rtol of its norm. Returns the worst error / bound."""
  c = np.abs(first["e"])
  dc = sum(np.abs(second["e"][k]) @ moves[k] for k in moves)
  assert set(grads) == set(ref), tag
  worst = 0.0
  for key, value in ref.items():
    bound = float(np.sum((dc + sample_rtol * c) * t.sample_grad_norms[key]))
    err = float(np.linalg.norm(grads[key].astype(np.float64) - value))
    assert err <= bound, (tag, key, err, bound, float(np.linalg.norm(value)))
    worst = max(worst, err / bound if bound else 0.0)  # bound 0: a parameter no sample's loss reaches
  return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_equals_the_pytorch_step(steps, torch_steps, case):
  name, objective, _ = CASES[case]
  ours, t = steps(case), torch_steps(case)
  cfg, schedule = ours.cfg, schedule_of(name)
  assert cfg.guidance == case_config(case).flow.guidance  # the config's guidance reaches the conditioning
  prepared = jax.device_get(prepare_batch(make_batch(FAMILIES[name]), cfg))
  np.testing.assert_array_equal(prepared["guidance"], np.full(PAIRS, cfg.guidance, np.float32))
  # Premise: our predictions on the same draws agree with diffusers' to F32_TOL, sample by sample.
  for k, (a, b) in t.predictions.items():
    per_sample_rel = [rel_l2(x, y) for x, y in zip(a, b)]
    assert max(per_sample_rel) <= F32_TOL, (k, per_sample_rel)
  # How far each weighted error e_i = w_i mean((p - y)^2) can move when p moves by at most eps_i = F32_TOL rms(p_i):
  # |de_i| <= w_i (2 sqrt(e_i / w_i) eps_i + eps_i^2); the reference's errors likewise. Each side evaluates the
  # objective in float32, which is the exact objective of inputs moved by a few ulps: ERR_RTOL |e_i| more.
  weights = diffusion.loss_weights(schedule, {"sigma": np.concatenate([t.draws["sigma"]] * 2)}, flow=cfg.flow)
  weights = np.ones(2 * PAIRS) if weights is None else np.asarray(weights, np.float64)
  moves = {}
  for k, (_, theirs) in t.predictions.items():
    eps = F32_TOL * np.sqrt(np.mean(np.square(theirs.astype(np.float64)), axis=(1, 2, 3)))
    x = t.inputs[k].astype(np.float64)
    moves[k] = weights * (2 * np.sqrt(x / weights) * eps + eps ** 2) + ERR_RTOL * np.abs(x)
  first, second = derivatives(case, cfg.hparams, t.inputs)
  loss_bound = sum(float(np.sum(np.abs(first[k]) * moves[k])) for k in moves)
  loss = float(ours.metrics["loss"])
  assert abs(loss - t.loss) <= loss_bound + 1e-6 * abs(t.loss), (loss, t.loss, loss_bound)
  # Each sample's gradient agrees to F32_TOL (tests/test_flux_transformer.py's bar for gradients).
  worst = assert_gradients_within(ours.grads, t.grads, t, first, second, moves, F32_TOL, case)
  # The SGD update p - lr g on both sides: lr times the gradient's difference, and each element rounded once.
  for key, before in t.params_before.items():
    torch_after = before.astype(np.float64) - LR * t.grads[key]
    assert np.linalg.norm(ours.params[key] - torch_after) <= (
        LR * np.linalg.norm(ours.grads[key] - t.grads[key]) + 2.0 ** -23 * np.linalg.norm(before)), key
  print(f"{case}: loss {loss:.6g}, PyTorch {t.loss:.6g} (bound {loss_bound:.2g}); gradient error at most "
        f"{worst:.2g} of its bound")


def same_step_bound(case, t: TorchStep):
  """float32 per-sample errors computed in another order (another mesh or micro-batch split) agree to ERR_RTOL
  relative (tests/test_train_step.py): each input moves by ERR_RTOL max|x|."""
  return {k: np.full_like(v, ERR_RTOL * float(np.max(np.abs(v))), dtype=np.float64) for k, v in t.inputs.items()}


def assert_same_step(case, a: Step, b: Step, t: TorchStep):
  """Loss within the objective's sensitivity times the reordering bound; every parameter's gradient within the
  bound of `assert_gradients_within` with each sample's gradient agreeing to ERR_RTOL."""
  moves = same_step_bound(case, t)
  first, second = derivatives(case, b.cfg.hparams, t.inputs)
  bound = sum(float(np.sum(np.abs(first[k]) * moves[k])) for k in moves)
  la, lb = float(a.metrics["loss"]), float(b.metrics["loss"])
  assert abs(la - lb) <= bound + 1e-6 * abs(lb), (la, lb, bound)
  return assert_gradients_within(a.grads, b.grads, t, first, second, moves, ERR_RTOL, (case, a.mesh_shape))


def test_a_sharded_step_equals_one_device(steps, torch_steps):
  """DPO (policy and reference both sharded) on a (1, 4, 2) mesh: the batch over 4 fsdp shards, the weights over
  fsdp x tensor."""
  case = "flux_dpo"
  worst = assert_same_step(case, steps(case, (1, 4, 2)), steps(case), torch_steps(case))
  print(f"sharded: gradient error at most {worst:.2g} of its bound")


@pytest.mark.parametrize("case", ["flux_mapo", "flux_dpo"])
def test_accumulation_equals_the_large_batch(steps, torch_steps, case):
  """Two micro-batches of 2 pairs (pairs 0, 2 and 1, 3) against one of 4: the draws are made for the whole batch."""
  worst = assert_same_step(case, steps(case, (1, 1, 1), 2), steps(case), torch_steps(case))
  print(f"{case} accumulated: gradient error at most {worst:.2g} of its bound")


# ------------------------------------------------------------------------------------------------ densities, weights
KS_SAMPLES = 20000
KS_CRITICAL = math.sqrt(-math.log(1e-3 / 2) / 2) / math.sqrt(KS_SAMPLES)  # Kolmogorov-Smirnov at alpha = 0.001


def u_cdf(x, flow: diffusion.FlowTraining):
  """P(u <= x) of compute_density_for_timestep_sampling's u, in closed form: uniform x; logit-normal
  Phi((logit x - m) / s); SD3's mode density u = f(v) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U[0, 1), f decreasing
  from 1 to 0 (SD3 paper eq. 20), so P(u <= x) = 1 - f^-1(x), inverted by bisection."""
  from scipy.special import logit, ndtr
  x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
  if flow.weighting_scheme == "logit_normal":
    with np.errstate(divide="ignore"):
      return ndtr((logit(x) - flow.logit_mean) / flow.logit_std)
  if flow.weighting_scheme == "mode":
    f = lambda v: 1 - v - flow.mode_scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)
    lo, hi = np.zeros_like(x), np.ones_like(x)
    for _ in range(60):
      mid = (lo + hi) / 2
      above = f(mid) > x  # f decreasing: the root lies right of mid
      lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 1 - (lo + hi) / 2
  return x


def sigma_cdf(schedule, flow):
  """(support ascending, P(sigma <= support)) of the drawn sigmas: sigma = table[floor(u T)] of the scheduler's
  descending training table, so P(sigma <= table[i]) = P(u >= i / T)."""
  _, table = diffusion.flow_train_tables(schedule)
  T = schedule.num_train_timesteps
  i = np.arange(T)
  return table[::-1].astype(np.float64), (1 - u_cdf(i / T, flow))[::-1]


@pytest.mark.parametrize("scheduler,flow", [
    ("sd3", diffusion.FlowTraining("none")),
    ("sd3", diffusion.FlowTraining("logit_normal", logit_mean=0.3, logit_std=1.2)),
    ("sd3", diffusion.FlowTraining("mode", mode_scale=1.29)),
    ("sd3", diffusion.FlowTraining("cosmap")),  # a weighting scheme: uniform draws
    ("flux", diffusion.FlowTraining("logit_normal")),  # dynamic shifting: the training table is not shifted
])
def test_the_steps_sigmas_follow_the_densitys_closed_form(scheduler, flow):
  schedule = schedule_of(scheduler)
  batch = {"moments_w": np.zeros((KS_SAMPLES, 1, 1, 2), np.float32)}
  draws = jax.device_get(jax.jit(lambda k: draw_noise(k, batch, schedule, flow))(jax.random.key(7)))
  np.testing.assert_array_equal(draws["t"], draws["sigma"] * np.float32(schedule.num_train_timesteps))
  support, cdf = sigma_cdf(schedule, flow)
  empirical = np.searchsorted(np.sort(draws["sigma"].astype(np.float64)), support, side="right") / KS_SAMPLES
  ks = float(np.max(np.abs(empirical - cdf)))  # exact for a discrete law (conservative against KS_CRITICAL)
  assert ks <= KS_CRITICAL, (ks, KS_CRITICAL)
  print(f"KS {ks:.4f} (critical {KS_CRITICAL:.4f})")
  if not schedule.use_dynamic_shifting:  # the test has power: the unshifted table's law is far off
    unshifted = dataclasses.replace(schedule, shift=1.0)
    support, cdf = sigma_cdf(unshifted, flow)
    empirical = np.searchsorted(np.sort(draws["sigma"].astype(np.float64)), support, side="right") / KS_SAMPLES
    assert float(np.max(np.abs(empirical - cdf))) > 10 * KS_CRITICAL


def test_loss_weights_equal_diffusers():
  from diffusers.training_utils import compute_loss_weighting_for_sd3
  sigmas = np.array(diffusion.flow_train_tables(schedule_of("sd3"))[1][::37])  # a writable copy for torch
  for scheme in diffusion.FLOW_WEIGHTINGS:
    ours = diffusion.loss_weights(schedule_of("sd3"), {"sigma": sigmas}, flow=diffusion.FlowTraining(scheme))
    theirs = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    if ours is None:  # weight 1: nothing to multiply
      np.testing.assert_array_equal(theirs, np.ones_like(sigmas))
    else:
      assert scheme in diffusion.FLOW_WEIGHTED
      np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ config checks
DDPM = diffusion.NoiseSchedule.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear"))


@pytest.mark.parametrize("schedule_name,key,value", [
    ("flow", "min_snr_gamma", 5.0),
    ("flow", "data.time_ids", "fixed"),
    ("ddpm", "flow.weighting_scheme", "logit_normal"),
    ("ddpm", "flow.logit_std", 2.0),
    ("ddpm", "flow.guidance", 1.0),
])
def test_keys_of_the_other_schedule_kind_fail_naming_the_key(schedule_name, key, value):
  config = config_lib.base_config()
  block, _, leaf = key.rpartition(".")
  (config[block] if block else config)[leaf] = value
  family, schedule = (flux, schedule_of("flux")) if schedule_name == "flow" else (sd, DDPM)
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{key}: ") as err:
    step_config(config, family, family.preset_latents({}), schedule)
  assert err.value.key == key


def test_defaults_on_either_kind():
  config = config_lib.base_config()
  ddpm = step_config(config, sd, sd.Latents(), DDPM)
  assert ddpm.guidance is None and ddpm.flow == diffusion.FlowTraining()
  flow = step_config(config, flux, flux.preset_latents({}), schedule_of("flux"))
  assert flow.guidance == flux.TRAIN_GUIDANCE == 3.5 and flow.flow == diffusion.FlowTraining("none", 0.0, 1.0, 1.29)


@pytest.mark.parametrize("key,value", [("flow.weighting_scheme", "logit-normal"), ("flow.logit_std", 0.0),
                                       ("flow.mode_scale", 2.0), ("flow.mode_scale", -1.5), ("flow.guidance", -1.0)])
def test_bad_flow_values_fail_naming_the_key(key, value):
  config = config_lib.base_config()
  config.pipeline, config.data.cache_dir = "/models/flux", "/data/cache"
  config.flow[key.split(".")[1]] = value
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.{key}: "):
    config_lib.validate(config)


# ------------------------------------------------------------------------------------------------ the recipes
FLOW_RECIPES = ("flux_dpo_lora", "flux_mapo_lora", "sd35_dpo", "sd35_mapo")
SOURCED = {"objective", "flow.weighting_scheme", "optim.lr", "global_batch_size", "accum_steps", "steps",
           "sample_guidance", "resolution"}


@pytest.mark.parametrize("name", FLOW_RECIPES)
def test_flow_recipes_validate_and_match_their_tables(name):
  """Each recipe validates (on 8 devices), names a flow-matching architecture for aot by its file name, passes that
  schedule's checks, and its docstring table (the values and their sources) is what it resolves to."""
  from mapo_jax import aot
  from test_config import documented_values, load
  config = load(name)
  config_lib.validate(config)
  config_lib.validate_for_devices(config, 8, 1)
  assert config.optim.total_steps == config.steps
  model = aot.resolve_model(None, config_lib.base_config(), f"configs/{name}.py")
  assert model.schedule.is_flow and model.family in (flux, sd3)
  config_lib.validate_for_schedule(config, model.schedule)
  documented = documented_values(name)
  assert SOURCED <= documented.keys(), SOURCED - documented.keys()
  resolved = config_lib.flatten(config)
  for key, value in documented.items():
    got = resolved[key]
    assert got == (pytest.approx(value) if isinstance(value, float) else value), (name, key, got, value)


# ------------------------------------------------------------------------------------------------ every objective
def test_every_objective_runs_on_the_weighted_velocity_errors():
  """Every objective (and the SDPO safeguard) in the step on a flow-matching schedule with cosmap weighting sees the
  per-sample errors w(sigma) mean((v_hat - (noise - x0))^2) at x_sigma = (1 - sigma) x0 + sigma noise, computed here
  by hand: its loss is the objective of those, within the float32-reordering bound. tests/test_objectives_step.py's
  tiny two-matrix denoiser stands in for a transformer (one compile per objective, each well under a second).
  Min-SNR weighting, defined by a DDPM schedule, is refused."""
  from test_objectives_step import CASES as OBJECTIVE_CASES, LATENTS, TinyDenoiser, denoise, make_batch as tiny_batch
  schedule, flow = schedule_of("sd3"), diffusion.FlowTraining("cosmap")
  cases = dict(OBJECTIVE_CASES, mapo=("mapo", {}, {}, False), dpo=("dpo", dict(beta=20.0), {}, False),
               rpo=("rpo", dict(beta=20.0), {}, False))
  graphdef, params = nnx.split(TinyDenoiser())
  ref_params = nnx.state(TinyDenoiser(seed=1))
  for case, (name, hp, extra, unpaired) in sorted(cases.items()):
    objective = objectives.get_objective(name)
    cfg = StepConfig(objective=name, hparams=dict(objective.hparams(num_timesteps=1000), **hp), latents=LATENTS,
                     flow=flow, **extra)
    batch = tiny_batch(unpaired=unpaired)
    batch["rpo_emb"] = batch["pooled_prompt_embeds"]
    draws = draw_noise(jax.random.key(5), batch, schedule, flow)
    loss_fn = jax.jit(make_loss_fn(denoise, graphdef, graphdef, schedule, cfg))
    frozen = Frozen(policy=nnx.State({}), reference=ref_params if objective.needs_reference else None)
    if cfg.min_snr_gamma:
      with pytest.raises(ValueError, match="min_snr_gamma"):
        loss_fn(params, frozen, batch, draws)
      continue
    loss, _ = loss_fn(params, frozen, batch, draws)
    keys = branches(batch, objective)
    sigma = np.concatenate([np.asarray(draws["sigma"])] * len(keys))[:, None, None, None]
    z = np.asarray(training_latents(batch, draws, LATENTS, keys))
    noise = np.concatenate([np.asarray(draws["noise"])] * len(keys))
    x = ((1 - sigma) * z + sigma * noise).astype(np.float32)
    t = np.concatenate([np.asarray(draws["t"])] * len(keys))
    cond = {"pooled_prompt_embeds": np.concatenate([batch["pooled_prompt_embeds"]] * len(keys))}
    run = lambda p: np.asarray(denoise(nnx.merge(graphdef, p), x, t, cond), np.float64)
    w = 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    err = lambda pred: np.mean(w * np.square(pred - (noise - z)), axis=(1, 2, 3))
    pred = run(params)
    stats = per_sample_statistics(jnp.asarray(pred, jnp.float32), jnp.asarray(noise - z, jnp.float32),
                                  None if frozen.reference is None else jnp.asarray(run(ref_params), jnp.float32),
                                  keys, jnp.asarray(w[:len(w) // len(keys), 0, 0, 0], jnp.float32))
    np.testing.assert_allclose(np.concatenate([stats["err" + s] for s in (("_w", "_l") if len(keys) == 2 else ("",))]),
                               err(pred), rtol=1e-5)
    if objective.unpaired:
      stats = dict(stats, label=batch["label"]) if unpaired else pairs_as_unpaired(stats)
    inputs = dict(stats, emb=batch.get("rpo_emb"), score_w=batch.get("score_w"), score_l=batch.get("score_l"))
    floats = {k: inputs[k] for k in objective.inputs if k not in ("label", "emb", "score_w", "score_l")}
    value = lambda f: objectives.call_objective(name, dict(inputs, **f), cfg.hparams)[0]
    grads = jax.grad(value)(floats)
    bound = sum(float(jnp.sum(jnp.abs(g))) for g in grads.values()) * ERR_RTOL * max(
        float(jnp.max(jnp.abs(v))) for v in floats.values())
    expected = float(value(floats))
    assert abs(float(loss) - expected) <= bound + 1e-6 * abs(expected), (case, float(loss), expected, bound)
