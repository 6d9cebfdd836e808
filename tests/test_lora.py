"""LoRA: our adapters against diffusers/PEFT (files both ways), the fused export, and LoRA training (adapters-off
reference, every objective, sharding, accumulation, non-finite skip, exact resume)."""
import json
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, rel_l2
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_evaluate import reward_dir  # noqa: F401  (a fixture: the reward model evaluate needs)
from test_train_step import LATENTS, SCHEDULE, first_step_errors, global_batch, initial_unet, loss_bound, make_batch
from test_unet import random_inputs, torch_forward

from mapo_jax import config as config_lib
from mapo_jax import generate
from mapo_jax.training import lora
from mapo_jax.training.build import build
from mapo_jax.run.checkpoint import Checkpointer, abstract_like
from mapo_jax.models import load_unet
from mapo_jax.models.presets import MICRO_SDXL_UNET, TINY_SD15_UNET
from mapo_jax.models.unet import init_unet
from mapo_jax.pipelines import sd
from mapo_jax.training.train_step import draw_noise, per_sample_errors

TARGETS = lora.DEFAULT_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RANK, ALPHA = 4, 2.0  # scale 1/2: a reader that dropped alpha / r would be off by 2x
# The UNet outputs agree to 1e-5 relative without LoRA (test_unet.py); the adapters add float32 products of
# rank 4, far below that, and the 1e-4 bound is the issue's.
RTOL = 1e-4


def randomize_b(model, seed=0, scale=0.3):
  """Non-zero B everywhere (a fresh adapter's B is 0, which would hide a wrong layout or scale)."""
  rng = np.random.default_rng(seed)
  for adapter in lora.adapted(model).values():
    adapter.b.set_value(jnp.asarray(rng.standard_normal(adapter.b.shape) * scale, jnp.float32))
  return model


def our_lora_unet(pipeline_dir, targets=TARGETS):
  unet = load_unet(pipeline_dir / "unet")
  lora.add_adapters(unet, rank=RANK, alpha=ALPHA, targets=targets, seed=0)
  return randomize_b(unet)


class Captured(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def diffusers_with_lora(pipeline_dir, lora_file):
  """StableDiffusionXLPipeline.from_pretrained(base).load_lora_weights(file) and every warning it logged."""
  from diffusers import StableDiffusionXLPipeline
  pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
  captured = Captured()
  logger = logging.getLogger("diffusers")
  logger.addHandler(captured)
  try:
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
  finally:
    logger.removeHandler(captured)
  return pipe, captured.messages


def outputs(ours, torch_unet, seed=0):
  x, t, ctx, extra = random_inputs(MICRO_SDXL_UNET, seed, size=8)
  return np.asarray(jit_call(ours, x, t, ctx, **extra)), torch_forward(torch_unet, x, t, ctx, extra)


@pytest.mark.parametrize("fmt", lora.FORMATS)
def test_export_loads_in_diffusers_with_the_same_outputs(fmt, micro_sdxl_pipeline_dir, tmp_path):
  ours = our_lora_unet(micro_sdxl_pipeline_dir)
  path = lora.save(ours, tmp_path, fmt)
  assert path.name == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}[fmt]
  pipe, warnings = diffusers_with_lora(micro_sdxl_pipeline_dir, path)
  # diffusers' warnings for keys that did not load ("... led to unexpected keys found in the model: ...",
  # "... led to missing keys in the model: ..."); the note that no text-encoder keys exist is expected.
  assert warnings and not [w for w in warnings if "unexpected keys" in w or "missing keys" in w], warnings
  mine, theirs = outputs(ours, pipe.unet)
  assert rel_l2(mine, theirs) <= RTOL
  pipe.unload_lora_weights()  # the adapters really matter: without them the outputs differ
  base = torch_forward(pipe.unet, *random_inputs(MICRO_SDXL_UNET, 0, size=8))
  assert rel_l2(base, theirs) > 100 * RTOL


@pytest.fixture(scope="module")
def peft_lora(micro_sdxl_pipeline_dir, tmp_path_factory):
  """A LoRA made by diffusers/PEFT: add_adapter(LoraConfig), random non-zero B, save_lora_weights with the
  adapter's metadata (alpha != r). Returns (file, the torch UNet with the adapter active)."""
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  unet = UNet2DConditionModel.from_pretrained(micro_sdxl_pipeline_dir / "unet")
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.DEFAULT_TARGETS), init_lora_weights="gaussian")
  unet.add_adapter(config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
  out = tmp_path_factory.mktemp("peft_lora")
  StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
  return out / lora.DIFFUSERS_FILE, unet.eval()


def test_peft_lora_loads_as_init_from_and_in_generate(peft_lora, micro_sdxl_pipeline_dir):
  path, torch_unet = peft_lora
  # init_from: a LoRA run's adapters (same targets and rank) take the file's values.
  unet = load_unet(micro_sdxl_pipeline_dir / "unet")
  cfg = config_lib.base_config().lora
  cfg.rank, cfg.alpha, cfg.init_from = RANK, 2 * ALPHA, str(path)  # another alpha: B is rescaled to match
  lora.from_config(unet, cfg, seed=0)
  mine, theirs = outputs(unet, torch_unet)
  assert rel_l2(mine, theirs) <= RTOL
  # generate / evaluate: the file on the pipeline's UNet, at weight 1 and at weight 0.5.
  pipe = generate.load_model(micro_sdxl_pipeline_dir, lora=path)
  mine, _ = outputs(pipe.unet, torch_unet)
  assert rel_l2(mine, theirs) <= RTOL
  half = generate.load_model(micro_sdxl_pipeline_dir, lora=path, lora_scale=0.5)
  from peft.tuners.lora import LoraLayer
  for module in torch_unet.modules():
    if isinstance(module, LoraLayer):
      module.scale_layer(0.5)
  try:
    mine, theirs = outputs(half.unet, torch_unet)
  finally:
    for module in torch_unet.modules():
      if isinstance(module, LoraLayer):
        module.unscale_layer(0.5)
  assert rel_l2(mine, theirs) <= RTOL


@pytest.mark.parametrize("fmt", lora.FORMATS)
def test_sd15_conv_projections_load_in_diffusers(fmt, tmp_path):
  """SD 1.x's proj_in / proj_out are 1x1 convolutions: their adapters are (r, in, 1, 1) / (out, r, 1, 1) tensors."""
  from conftest import make_diffusers_unet
  from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
  from safetensors.torch import load_file
  torch_unet = make_diffusers_unet(TINY_SD15_UNET, tmp_path / "unet")
  ours = load_unet(tmp_path / "unet")
  names = lora.add_adapters(ours, rank=RANK, alpha=ALPHA, targets=("to_q", "proj_in", "proj_out"), seed=0)
  assert "down_blocks.0.attentions.0.proj_in" in names
  randomize_b(ours)
  tensors = load_file(lora.save(ours, tmp_path, fmt))
  alphas = None
  if fmt == "kohya":  # as load_lora_weights converts a kohya file
    tensors, alphas = _convert_non_diffusers_lora_to_diffusers(tensors)
  torch_unet.load_lora_adapter(tensors, prefix="unet", network_alphas=alphas)
  x, t, ctx, extra = random_inputs(TINY_SD15_UNET, 0, size=8)
  assert rel_l2(jit_call(ours, x, t, ctx, **extra), torch_forward(torch_unet, x, t, ctx, extra)) <= RTOL
  # And back: the file read into a fresh model gives the same adapters.
  fresh = load_unet(tmp_path / "unet")
  lora.load_into(fresh, tmp_path / {"diffusers": lora.DIFFUSERS_FILE, "kohya": lora.KOHYA_FILE}[fmt])
  assert rel_l2(jit_call(fresh, x, t, ctx, **extra), jit_call(ours, x, t, ctx, **extra)) <= 1e-6


def test_fuse_equals_base_plus_lora(micro_sdxl_pipeline_dir):
  ours = our_lora_unet(micro_sdxl_pipeline_dir)
  x, t, ctx, extra = random_inputs(MICRO_SDXL_UNET, 0, size=8)
  adapted = np.asarray(jit_call(ours, x, t, ctx, **extra))
  fused = lora.fuse(ours)
  assert not lora.adapted(fused)
  # W + s·A·B in float32 rounds each weight once: a float32-level difference in the output.
  assert rel_l2(jit_call(fused, x, t, ctx, **extra), adapted) <= 1e-5


# --- bad input --------------------------------------------------------------------------------------------

def test_file_whose_rank_or_targets_do_not_fit(peft_lora, micro_sdxl_pipeline_dir):
  path, _ = peft_lora
  cfg = config_lib.base_config().lora
  cfg.rank, cfg.init_from = RANK * 2, str(path)
  with pytest.raises(lora.LoRAFileError, match=r"pytorch_lora_weights.safetensors: key 'unet.down_blocks.1.attentions"
                     r".0.transformer_blocks.0.attn1.to_k.lora_A.weight' has rank 4, config.lora.rank is 8"):
    lora.from_config(load_unet(micro_sdxl_pipeline_dir / "unet"), cfg, seed=0)
  cfg.rank, cfg.targets = RANK, ("to_q", "to_k")
  with pytest.raises(lora.LoRAFileError, match=r"does not fit config.lora.targets: modules the targets do not "
                     r"select: \['down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0'"):
    lora.from_config(load_unet(micro_sdxl_pipeline_dir / "unet"), cfg, seed=0)


def test_kohya_file_for_another_architecture(micro_sdxl_pipeline_dir, tmp_path):
  sd15 = init_unet(TINY_SD15_UNET, seed=0)
  lora.add_adapters(sd15, rank=RANK, alpha=ALPHA, targets=lora.DEFAULT_TARGETS, seed=0)
  path = lora.save(sd15, tmp_path, "kohya")  # SD 1.x: attention in down_blocks.0, which the SDXL layout lacks
  with pytest.raises(lora.LoRAFileError, match=r"lora_kohya.safetensors: key 'lora_unet_down_blocks_0_attentions_0_"
                     r"transformer_blocks_0_attn1_to_k.alpha' names module .* not a linear layer \(or 1x1 "
                     r"convolution\) of this model"):
    generate.load_model(micro_sdxl_pipeline_dir, lora=path)


def test_unsupported_keys_are_named(micro_sdxl_pipeline_dir, tmp_path):
  from safetensors.numpy import save_file
  good = lora.diffusers_state_dict(our_lora_unet(micro_sdxl_pipeline_dir))
  for extra, message in [({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8))},
                          "text-encoder adapter"),
                         ({"unet.conv_in.lora_A.weight": np.zeros((4, 4, 3, 3))}, "not a linear layer")]:
    save_file({**good, **{k: v.astype(np.float32) for k, v in extra.items()}}, tmp_path / "bad.safetensors")
    with pytest.raises(lora.LoRAFileError, match=f"bad.safetensors: key '{list(extra)[0]}' .*{message}"):
      generate.load_model(micro_sdxl_pipeline_dir, lora=tmp_path / "bad.safetensors")


@pytest.mark.parametrize("key,value,message", [
    ("lora.rank", -1, "config.lora.rank: -1 must be >= 0"),
    ("lora.alpha", 0.0, "config.lora.alpha: 0.0 must be > 0"),
    ("lora.targets", (), "config.lora.targets: "),
    ("lora.init_from", "/nonexistent.safetensors", "config.lora.init_from: '/nonexistent.safetensors' is not a file"),
    ("lora.base_dtype", "int8", "config.lora.base_dtype: 'int8' is not one of"),
    ("lora.dropout", 1.0, "config.lora.dropout: 1.0 must be in [0, 1)"),
])
def test_config_errors(key, value, message):
  config = config_lib.base_config()
  config.pipeline, config.data.cache_dir, config.lora.rank = "/p", "/c", 4
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_resume_refuses_a_changed_rank_but_not_a_run_from_before_lora(tmp_path):
  from mapo_jax.run import workdir as workdir_lib
  config = config_lib.base_config()
  config.pipeline, config.data.cache_dir = "/p", "/c"
  before_lora = json.loads(config.to_json())
  del before_lora["lora"]  # what a run of an older version recorded
  workdir_lib.record_config(tmp_path, json.dumps(before_lora), 0)
  workdir_lib.check_resume_config(tmp_path, json.loads(config.to_json()), allow_change=False)  # rank 0: the same
  config.lora.rank = 8
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"config.lora.rank: 0 -> 8"):
    workdir_lib.check_resume_config(tmp_path, json.loads(config.to_json()), allow_change=False)


def test_targets_must_select_linear_layers():
  with pytest.raises(ValueError, match=r"config.lora.targets: 'conv1' matches only other modules \(Conv2d"):
    lora.add_adapters(init_unet(MICRO_SDXL_UNET, seed=0), rank=4, alpha=4.0, targets=("conv1",), seed=0)


# --- training ---------------------------------------------------------------------------------------------

def lora_config(objective, *, mesh=(1, 1, 1), accum=1, lr=1e-3, eps=1e-8):
  config = config_lib.base_config()
  config.objective, config.global_batch_size, config.accum_steps, config.mesh = objective, 8, accum, mesh
  config.optim.lr, config.optim.eps = lr, eps
  config.lora.rank, config.lora.alpha = RANK, float(RANK)
  config.remat = "none"  # the same numbers, compiled faster
  return config


def lora_build(config):
  """`build` on the micro UNet, its base stored in config.lora.base_dtype as the trainer loads it."""
  graphdef, params = initial_unet()
  base = jnp.dtype(config.lora.base_dtype)
  unet = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, base), params))
  mesh = jax.make_mesh(config.mesh, ("data", "fsdp", "tensor"), devices=jax.devices()[:int(np.prod(config.mesh))],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return build(config, sd, unet, None, SCHEDULE, LATENTS, mesh), mesh


def test_only_adapters_train_and_the_base_is_frozen_in_bf16():
  built, _ = lora_build(lora_config("mapo"))
  leaves = jax.tree_util.tree_leaves_with_path(built.state.params)
  assert leaves and all(str(path[-1].key) in ("a", "b") and x.dtype == jnp.float32 for path, x in leaves)
  assert {x.dtype for x in jax.tree.leaves(built.frozen.policy)} == {jnp.dtype(jnp.bfloat16)}
  assert built.frozen.reference is None
  mu = built.state.opt_state[1][0].mu  # Adam's moments: exactly the adapters' tree
  assert jax.tree.structure(mu) == jax.tree.structure(built.state.params)
  trainable = sum(x.size for x in jax.tree.leaves(built.state.params))
  assert trainable < 0.05 * sum(x.size for x in jax.tree.leaves(built.frozen.policy))


STEPS = 8
LR = {"mapo": 1e-2, "sft": 1e-2, "dpo": 1e-3, "rpo": 1e-3}  # the same program (persistent-cache hits) per objective


@pytest.mark.parametrize("objective", ["mapo", "dpo", "rpo", "sft"])
def test_training_lowers_the_objective_on_a_fixed_batch(objective):
  built, mesh = lora_build(lora_config(objective, lr=LR[objective]))
  batch = global_batch(make_batch(), mesh)
  evaluate = lambda params: float(built.eval_step(params, batch, built.frozen)["loss"])
  before = evaluate(built.state.params)
  state, losses = built.state, []
  for _ in range(STEPS):
    state, metrics = built.train_step(state, batch, built.frozen)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and int(state.skipped) == 0
  assert evaluate(state.params) < before - 1e-4
  if objective == "dpo":
    # B = 0 at step 0: the policy is the base exactly, so every inside term is 0 and the loss log 2, up to the
    # float32 rounding of the per-sample errors in two differently fused programs (policy under autodiff,
    # reference not), which β = 5000 amplifies: test_train_step's bound.
    assert losses[0] == pytest.approx(math.log(2), abs=loss_bound("dpo", first_step_errors((1, 1, 1))))
  if objective in ("dpo", "rpo"):
    # The reference errors of the last step (adapters switched off; the adapters have moved the policy away)
    # are those of a separately built base model on the same draws.
    assert abs(losses[-1] - losses[0]) > 1e-3
    draws = draw_noise(jax.random.fold_in(jax.random.key(0), STEPS - 1), batch, SCHEDULE.num_train_timesteps)
    graphdef, params = initial_unet()
    base = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params))
    ref_w, ref_l = jax.jit(lambda m: per_sample_errors(sd.denoise, m, batch, draws, SCHEDULE, LATENTS, True))(base)
    assert float(metrics["ref_mse_w"]) == pytest.approx(float(jnp.mean(ref_w)), rel=2 ** -20)
    assert float(metrics["ref_mse_l"]) == pytest.approx(float(jnp.mean(ref_l)), rel=2 ** -20)


def test_sharded_and_accumulated_steps_equal_one_device():
  ref_built, ref_mesh = lora_build(lora_config("mapo", eps=1e-3))
  ref_state, ref_metrics = ref_built.train_step(ref_built.state, global_batch(make_batch(), ref_mesh), ref_built.frozen)
  bound = loss_bound("mapo", first_step_errors((1, 1, 1)))
  for mesh_shape, accum in [((1, 4, 2), 2)]:  # one compile: sharded over fsdp and tensor, and accumulated
    built, mesh = lora_build(lora_config("mapo", mesh=mesh_shape, accum=accum, eps=1e-3))
    state, metrics = built.train_step(built.state, global_batch(make_batch(), mesh), built.frozen)
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) <= bound + 1e-6, (mesh_shape, accum)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
      assert rel_l2(a, b) <= 1e-4 + bound, (mesh_shape, accum)
    # Adapters are sharded by their layer's rules: A on its input axis, B on its output axis.
    attn = state.params["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn2"]
    assert attn["to_k"]["lora"]["a"].sharding.spec == P("fsdp", None)  # (kv_embed, rank)
    assert attn["to_k"]["lora"]["b"].sharding.spec == P(None, "tensor")  # (rank, heads)
    mu = state.opt_state[1][0].mu["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn2"]
    assert mu["to_k"]["lora"]["b"].sharding == attn["to_k"]["lora"]["b"].sharding
    policy = built.frozen.policy["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn2"]
    assert policy["to_k"]["kernel"].sharding.spec == P("fsdp", "tensor")  # the frozen base: the same rules


def test_adapter_dropout_is_peft_inverted_dropout_on_the_adapter_input():
  """s · (drop(x) A) B: per element, kept with probability 1 - p and scaled by 1 / (1 - p); its mean over
  masks is the undropped update; without a key (reference, evaluation, export) no dropout at all."""
  p, rank, fan_in, fan_out = 0.25, 4, 16, 8
  rng = np.random.default_rng(0)
  a, b, x = rng.normal(size=(fan_in, rank)), rng.normal(size=(rank, fan_out)), rng.normal(size=(3, fan_in))
  adapter = lora.LoRA(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 0.5, ("embed", "mlp"), dropout=p)
  full = 0.5 * x @ a @ b
  np.testing.assert_allclose(np.asarray(adapter(jnp.asarray(x, jnp.float32))), full, rtol=1e-5, atol=1e-6)
  key = jax.random.key(7)
  keep = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))
  adapter.dropout_key = nnx.data(lora.DropoutKey(jax.random.key_data(key)))
  got = np.asarray(adapter(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, 0.5 * (x * keep / (1 - p)) @ a @ b, rtol=1e-5, atol=1e-6)
  assert 0 < (~keep).sum() < keep.size
  # Over n masks the mean update is the undropped one, within 5 standard errors per entry.
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  masks = np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 1 - p, x.shape))(keys))
  outs = np.einsum("nbi,ir,ro->nbo", x * masks / (1 - p), 0.5 * a, b)
  assert np.all(np.abs(outs.mean(0) - full) <= 5 * outs.std(0) / np.sqrt(n))


def test_adapter_dropout_acts_in_training_steps_only():
  """With config.lora.dropout > 0 a training step differs from one without (from adapters trained one step,
  so B != 0), while the evaluation step (no dropout) and the adapters-off reference stay the same."""
  built = {}
  for p in (0.0, 0.5):
    config = lora_config("dpo", lr=LR["dpo"])
    config.lora.dropout = p
    built[p], mesh = lora_build(config)
  batch = global_batch(make_batch(), mesh)
  state, _ = built[0.0].train_step(built[0.0].state, batch, built[0.0].frozen)
  state = jax.tree.map(np.asarray, state)  # donated below, twice
  evaluated = {p: b.eval_step(state.params, batch, b.frozen) for p, b in built.items()}
  stepped = {p: b.train_step(jax.tree.map(jnp.asarray, state), batch, b.frozen)[1] for p, b in built.items()}
  for k in ("loss", "mse_w", "ref_mse_w"):
    assert float(evaluated[0.0][k]) == float(evaluated[0.5][k]), k
  assert float(stepped[0.0]["ref_mse_w"]) == float(stepped[0.5]["ref_mse_w"])  # the reference never drops
  assert float(stepped[0.0]["mse_w"]) != float(stepped[0.5]["mse_w"])  # the policy does, in training


def test_non_finite_loss_skips_the_update():
  built, mesh = lora_build(lora_config("dpo", lr=LR["dpo"]))
  before = jax.tree.map(np.asarray, built.state.params)
  batch = make_batch()
  batch["moments_w"][0, 0, 0, 0] = np.nan
  state, metrics = built.train_step(built.state, global_batch(batch, mesh), built.frozen)
  assert int(state.skipped) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_checkpoint_holds_only_adapters_and_resume_is_bit_identical(tmp_path):
  built, mesh = lora_build(lora_config("dpo", lr=LR["dpo"]))
  batch = global_batch(make_batch(), mesh)
  state = built.state
  for _ in range(2):
    state, _ = built.train_step(state, batch, built.frozen)
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  checkpointer.save(2, state)
  checkpointer.wait()
  straight = state
  for _ in range(2):
    straight, _ = built.train_step(straight, batch, built.frozen)
  restored = checkpointer.restore(2, abstract_like(built.state, built.state_shardings))
  # What the checkpoint holds, read back without a target: the adapters, their optimizer state and counters.
  import orbax.checkpoint as ocp
  raw = checkpointer.manager.restore(2, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                                  train=ocp.args.StandardRestore()))
  checkpointer.close()
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(raw["params"])]
  assert names and all(n.endswith(("['lora']['a']", "['lora']['b']")) for n in names), names[:3]
  adapters = sum(x.nbytes for x in jax.tree.leaves(state.params))
  saved = sum(np.asarray(x).nbytes for x in jax.tree.leaves((raw["params"], raw["train"])))
  assert 3 * adapters <= saved < 3 * adapters + 1024  # A, B and Adam's two moments; never the base
  for _ in range(2):
    restored, _ = built.train_step(restored, batch, built.frozen)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the trainer, export and generate end to end -----------------------------------------------------------

def test_trainer_exports_adapters_and_the_export_cli_writes_kohya_and_fused(
    demo_assets, trainer_env, reward_dir, tmp_path):  # noqa: F811 (reward_dir: the imported fixture)
  from conftest import run_trainer
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
  from mapo_jax import export
  workdir = tmp_path / "run"
  run_trainer(trainer_env(fast_compile=True), workdir, demo_assets, "--config.objective=dpo", "--config.lora.rank=4",
              "--config.lora.alpha=2.0", "--config.steps=4", "--config.sample_every=0", "--config.log_every=2",
              "--config.checkpoint_every=4", "--config.optim.lr=1e-2")
  assert sorted(p.name for p in (workdir / "export").iterdir()) == sorted([lora.DIFFUSERS_FILE, "README.md"])  # and its model card
  base = demo_assets / "pipeline"
  for args in (["--format", "kohya"], ["--fuse"]):
    export.main(export.parse_flags(["export", "--checkpoint", str(workdir), "--base", str(base),
                                    "--out", str(tmp_path / args[0][2:]), *args]))
  # The trainer's diffusers file, the CLI's kohya file and the fused UNet: one model three ways.
  cfg = json.loads((base / "unet" / "config.json").read_text())
  x, t, ctx, extra = random_inputs(cfg, 0, size=8)
  pipe = StableDiffusionXLPipeline.from_pretrained(base)
  plain = torch_forward(pipe.unet, x, t, ctx, extra)
  pipe.load_lora_weights(str(workdir / "export"), weight_name=lora.DIFFUSERS_FILE)
  trained = torch_forward(pipe.unet, x, t, ctx, extra)
  assert rel_l2(trained, plain) > 1e-3  # the 4 steps moved the adapters
  pipe.unload_lora_weights()
  pipe.load_lora_weights(str(tmp_path / "format"), weight_name=lora.KOHYA_FILE)
  assert rel_l2(torch_forward(pipe.unet, x, t, ctx, extra), trained) <= RTOL
  fused = UNet2DConditionModel.from_pretrained(tmp_path / "fuse" / "unet")
  assert rel_l2(torch_forward(fused, x, t, ctx, extra), trained) <= RTOL
  # generate --lora samples what the fused pipeline samples (same noise; float32 rounding of W + s·A·B apart).
  latents = {}
  for name, args in (("lora", ["--model", str(base), "--lora", str(tmp_path / "format" / lora.KOHYA_FILE)]),
                     ("fused", ["--model", str(tmp_path / "fuse")])):
    generate.main(generate.parse_flags(["generate", *args, "--prompt", "a red circle", "--out", str(tmp_path / name),
                                        "--steps", "2", "--output-latents", str(tmp_path / f"{name}.npy")]))
    latents[name] = np.load(tmp_path / f"{name}.npy")
  assert json.loads((tmp_path / "lora" / "metadata.json").read_text())["lora_scale"] == 1.0
  assert rel_l2(latents["lora"], latents["fused"]) <= RTOL
  # evaluate --lora-b: model B is the base with the LoRA, sampled as generate --lora samples it.
  from PIL import Image
  from mapo_jax import evaluate
  (tmp_path / "prompts.txt").write_text("a red circle\n")
  evaluate.main(evaluate.parse_flags([
      "evaluate", "--model-a", str(base), "--model-b", str(base),
      "--lora-b", str(tmp_path / "format" / lora.KOHYA_FILE),
      "--rewards", f"pickscore={reward_dir[0]}", "--prompts", str(tmp_path / "prompts.txt"),
      "--out", str(tmp_path / "eval"),
      "--steps", "2"]))
  png = lambda path: np.asarray(Image.open(path))
  np.testing.assert_array_equal(png(tmp_path / "eval" / "b" / "0000.png"), png(tmp_path / "lora" / "0000.png"))
  assert not np.array_equal(png(tmp_path / "eval" / "a" / "0000.png"), png(tmp_path / "eval" / "b" / "0000.png"))
