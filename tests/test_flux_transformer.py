"""The Flax NNX FLUX.1 transformer against diffusers' FluxTransformer2DModel on tiny random checkpoints (with and
without guidance_embeds): forward, input and parameter gradients vs torch autograd, weight conversion both ways,
sharded on the 8-device CPU mesh, bfloat16 compute, config validation and the full-size layouts."""
from __future__ import annotations

import copy
import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel as TorchFlux
from flax import nnx
from safetensors.numpy import load_file

from conftest import jit_call, rel_l2
from flow_fixtures import flux_transformer_inputs, make_diffusers_flux_transformer
from mapo_jax import convert, sharding
from mapo_jax.models.flux import (DIFFUSERS_DEFAULTS, FluxConfig, abstract_flux_transformer, latent_image_ids,
                                  load_flux_transformer, save_flux_transformer)
from mapo_jax.models.presets import (FLUX1_DEV_TRANSFORMER, FLUX1_SCHNELL_TRANSFORMER, FLUX_TRANSFORMERS,
                                     TINY_FLUX_SCHNELL_TRANSFORMER, TINY_FLUX_TRANSFORMER)

CONFIGS = {"guidance": TINY_FLUX_TRANSFORMER, "no_guidance": TINY_FLUX_SCHNELL_TRANSFORMER}
# float32 through a few dozen matmuls and norms: the project's bar for a forward pass and its gradients.
F32_TOL = 1e-4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """name -> (name, config, the perturbed diffusers model, its saved folder), each made once."""
  cache = {}

  def get(name):
    if name not in cache:
      path = tmp_path_factory.mktemp(f"flux_{name}")
      cache[name] = name, CONFIGS[name], make_diffusers_flux_transformer(CONFIGS[name], path), path
    return cache[name]

  return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, made):
  return made(request.param)


@pytest.fixture(scope="module")
def guidance_pair(made):
  """The guidance config alone, for checks that do not depend on the config (sharding)."""
  return made("guidance")


def torch_forward(model, inputs, grad=False):
  """diffusers' output; with `grad`, also the gradient of sum(output · weights) (fixed random weights) w.r.t.
  hidden_states, encoder_hidden_states and every parameter (by state-dict key)."""
  tensors = {k: torch.tensor(v) for k, v in inputs.items()}
  if not grad:
    with torch.no_grad():
      return model(**tensors).sample.numpy()
  for key in ("hidden_states", "encoder_hidden_states"):
    tensors[key].requires_grad_(True)
  model.zero_grad(set_to_none=True)
  out = model(**tensors).sample
  (out * torch.tensor(output_weights(out.shape))).sum().backward()
  params = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
  grads = (tensors[k].grad.numpy() for k in ("hidden_states", "encoder_hidden_states"))
  return out.detach().numpy(), *grads, params


def output_weights(shape):
  return np.random.default_rng(123).standard_normal(tuple(shape)).astype(np.float32)


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_and_grads(state, inputs, graphdef):
  def loss(state, hidden, context):
    out = nnx.merge(graphdef, state)(**{**inputs, "hidden_states": hidden, "encoder_hidden_states": context})
    return jnp.sum(out * output_weights(out.shape)), out
  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  return grad(state, inputs["hidden_states"], inputs["encoder_hidden_states"])


def jax_grads(model, inputs):
  """Our output, input gradients and parameter gradients (as a PyTorch-layout state dict)."""
  graphdef, state = nnx.split(model)
  (g_state, g_hidden, g_context), out = _loss_and_grads(state, inputs, graphdef=graphdef)
  params = convert.state_dict(nnx.merge(graphdef, g_state))
  return out, g_hidden, g_context, params


def test_defaults_are_diffusers():
  signature = inspect.signature(TorchFlux.__init__).parameters
  want = {k: p.default for k, p in signature.items() if k != "self"}
  assert {k: list(v) if isinstance(v, tuple) else v for k, v in DIFFUSERS_DEFAULTS.items()} == {
      k: list(v) if isinstance(v, tuple) else v for k, v in want.items()}


def test_forward_matches_diffusers(pair):
  name, cfg, torch_model, path = pair
  model = load_flux_transformer(path)
  # A non-square 3 x 5 packed grid as FluxPipeline builds it; then a 2 x 4 grid with random positions on every
  # rotary axis (text too), passed the deprecated batched (3-D) way for ours.
  inputs = flux_transformer_inputs(cfg, 0, height=3, width=5, tokens=7)
  ours = jit_call(model, **inputs)
  assert ours.shape == (2, 15, cfg["in_channels"]) and ours.dtype == jnp.float32
  assert rel_l2(ours, torch_forward(torch_model, inputs)) <= F32_TOL
  rng = np.random.default_rng(1)
  inputs = flux_transformer_inputs(cfg, 1, height=2, width=4, tokens=5)
  inputs.update(img_ids=rng.uniform(0, 9, (8, 3)).astype(np.float32),
                txt_ids=rng.uniform(0, 9, (5, 3)).astype(np.float32))
  batched = dict(inputs, img_ids=np.stack([inputs["img_ids"]] * 2), txt_ids=np.stack([inputs["txt_ids"]] * 2))
  assert rel_l2(jit_call(model, **batched), torch_forward(torch_model, inputs)) <= F32_TOL


def test_gradients_match_torch_autograd(pair):
  """d sum(output · w) / d (hidden_states, encoder_hidden_states, every parameter) against torch autograd; on
  the guidance config also rematerialised with XLA attention (the same numbers)."""
  name, cfg, torch_model, path = pair
  inputs = flux_transformer_inputs(cfg, 2, height=4, width=3, tokens=6)
  ref_out, ref_hidden, ref_context, ref_params = torch_forward(torch_model, inputs, grad=True)
  assert all(np.any(ref) for ref in ref_params.values())  # every parameter takes part
  for options in [{}] + ([{"remat": "full", "attention": "xla"}] if name == "guidance" else []):
    out, g_hidden, g_context, g_params = jax_grads(load_flux_transformer(path, **options), inputs)
    assert rel_l2(out, ref_out) <= F32_TOL
    assert rel_l2(g_hidden, ref_hidden) <= F32_TOL, options
    assert rel_l2(g_context, ref_context) <= F32_TOL, options
    assert set(g_params) == set(ref_params)
    errors = {key: rel_l2(g_params[key], ref) for key, ref in ref_params.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= F32_TOL, (options, worst, errors[worst])


def test_latent_image_ids_match_the_pipeline():
  from diffusers import FluxPipeline
  for h, w in ((3, 5), (4, 4), (1, 7)):
    ref = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(latent_image_ids(h, w), ref)


def test_save_round_trip_is_bit_exact(pair, tmp_path):
  name, cfg, torch_model, path = pair
  model = load_flux_transformer(path)
  save_flux_transformer(model, tmp_path / "out")
  ref, got = (load_file(p / f"{convert.DIFFUSERS_STEM}.safetensors") for p in (path, tmp_path / "out"))
  assert set(got) == set(ref)
  for key in ref:
    assert got[key].dtype == ref[key].dtype and np.array_equal(got[key], ref[key]), key
  reloaded, info = TorchFlux.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  assert reloaded.config.guidance_embeds == cfg["guidance_embeds"]
  inputs = flux_transformer_inputs(cfg, 3)
  np.testing.assert_array_equal(torch_forward(reloaded.eval(), inputs), torch_forward(torch_model, inputs))
  again = load_flux_transformer(tmp_path / "out")
  assert again.config == model.config
  assert torch_shapes(abstract_flux_transformer(tmp_path / "out")) == torch_shapes(again)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pipeline_folder_shards_and_half_variants(pair, tmp_path):
  name, cfg, torch_model, path = pair
  ref = nnx.to_pure_dict(nnx.state(load_flux_transformer(path)))
  torch_model.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
  assert (tmp_path / "pipe" / "transformer" / f"{convert.DIFFUSERS_STEM}.safetensors.index.json").exists()
  sharded = nnx.to_pure_dict(nnx.state(load_flux_transformer(tmp_path / "pipe")))  # finds transformer/
  jax.tree.map(np.testing.assert_array_equal, sharded, ref)
  # The bf16 / fp16 variant files, loaded (bf16 parameters; float32 ones) and exported in the same dtype, are
  # the variant's own tensors again.
  for variant, torch_dtype, param_dtype in (("bf16", torch.bfloat16, jnp.bfloat16),
                                            ("fp16", torch.float16, jnp.float32)):
    want = copy.deepcopy(torch_model).to(torch_dtype)
    want.save_pretrained(tmp_path / variant, variant=variant)
    half = load_flux_transformer(tmp_path / variant, variant=variant, param_dtype=param_dtype)
    assert all(p.dtype == param_dtype for p in jax.tree.leaves(nnx.state(half)))
    save_flux_transformer(half, tmp_path / f"{variant}_out", variant)
    exported = TorchFlux.from_pretrained(tmp_path / f"{variant}_out", torch_dtype=torch_dtype).state_dict()
    for key, value in want.state_dict().items():
      assert exported[key].dtype == torch_dtype and torch.equal(exported[key], value), (variant, key)


def on_mesh(model, mesh, inputs, batch_sharded):
  """One forward pass with the parameters placed on `mesh` by the logical-axis rules (sharding.place), the
  inputs' batch split over the batch axes or replicated."""
  params, _ = sharding.place(model, mesh)
  spec = lambda k: sharding.batch_sharding(mesh) if batch_sharded and k not in ("img_ids", "txt_ids") else (
      sharding.replicated(mesh))
  inputs = {k: jax.device_put(v, spec(k)) for k, v in inputs.items()}
  graphdef = nnx.graphdef(model)
  with jax.set_mesh(mesh):
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(**x))(params, inputs)


def test_sharded_mesh_matches_one_device(guidance_pair):
  """The batch over fsdp and the parameters by the logical-axis rules on a (1, 4, 2) mesh (three-axis meshes are
  refused: sharding.check_partitioning), placed after
  loading (sharding.place) or born sharded (load_flux_transformer(mesh=)): one device's numbers, up to the
  order of partial sums."""
  name, cfg, _, path = guidance_pair
  inputs = flux_transformer_inputs(cfg, 4, batch=4, height=2, width=3, tokens=4)
  ref = jit_call(load_flux_transformer(path), **inputs)
  mesh = sharding.make_mesh((1, 4, 2))
  for model in (load_flux_transformer(path), load_flux_transformer(path, mesh=mesh)):
    specs = jax.tree.leaves(sharding.model_shardings(model, mesh))
    assert sum(not s.is_fully_replicated for s in specs) >= 0.8 * len(specs)  # all but the QK-norm scales
    assert rel_l2(on_mesh(model, mesh, inputs, batch_sharded=True), ref) <= 1e-6


def test_bfloat16_compute_close_to_float32(pair):
  name, cfg, torch_model, path = pair
  inputs = flux_transformer_inputs(cfg, 5)
  out = jit_call(load_flux_transformer(path, dtype=jnp.bfloat16), **inputs)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
  ref = jit_call(load_flux_transformer(path), **inputs)
  err = rel_l2(out.astype(jnp.float32), ref)
  # bf16 keeps 8 significant bits: each matmul operand and output, activation and residual sum is rounded with
  # relative error <= u = 2^-8, errors of independent sign that add in quadrature and are not amplified much by
  # this small network (measured: about 1.5 u). 4 u bounds it without hiding a wrong op.
  assert err <= 4 * 2**-8
  # diffusers in bfloat16 on the same inputs is no closer to float32 (it also rounds the sigmas to bf16).
  with torch.no_grad():
    theirs = copy.deepcopy(torch_model).to(torch.bfloat16)(
        **{k: torch.tensor(v).to(torch.bfloat16) for k, v in inputs.items()}).sample.float().numpy()
  assert err <= rel_l2(theirs, ref)


def test_guidance_must_match_the_config(pair):
  name, cfg, _, path = pair
  model = load_flux_transformer(path)
  inputs = flux_transformer_inputs(cfg, 6)
  if cfg["guidance_embeds"]:
    del inputs["guidance"]
  else:
    inputs["guidance"] = np.full(2, 3.5, np.float32)
  with pytest.raises(ValueError, match="guidance"):
    model(**inputs)


@pytest.mark.parametrize("key,value", [("no_such_option", 1), ("axes_dims_rope", [2, 2, 2]),
                                       ("axes_dims_rope", [3, 1, 4]), ("guidance_embeds", "yes"),
                                       ("num_attention_heads", 0), ("patch_size", 1.5)])
def test_unsupported_options_name_the_key(key, value, tmp_path):
  config = dict(TINY_FLUX_TRANSFORMER, **{key: value})
  with pytest.raises(ValueError, match=key):
    FluxConfig.from_dict(config)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=key):  # before looking for any weights (there are none)
    load_flux_transformer(tmp_path)


def test_any_layout_diffusers_builds(tmp_path):
  """A config unlike the presets (patch_size 2, explicit out_channels, two rotary axes, one block of each kind,
  odd token counts): built from its config.json alone, it matches diffusers."""
  cfg = dict(patch_size=2, in_channels=6, out_channels=3, num_layers=1, num_single_layers=1, attention_head_dim=12,
             num_attention_heads=3, joint_attention_dim=10, pooled_projection_dim=5, axes_dims_rope=[4, 8])
  torch_model = make_diffusers_flux_transformer(cfg, tmp_path, seed=7)
  inputs = flux_transformer_inputs(dict(cfg, guidance_embeds=False), 7, batch=1, height=3, width=3, tokens=3)
  inputs.update(img_ids=latent_image_ids(3, 3)[:, 1:], txt_ids=np.zeros((3, 2), np.float32))
  out = jit_call(load_flux_transformer(tmp_path), **inputs)
  assert out.shape == (1, 9, 2 * 2 * 3)
  assert rel_l2(out, torch_forward(torch_model, inputs)) <= F32_TOL


@pytest.mark.parametrize("name", ["flux1_dev", "flux1_schnell"])
def test_full_size_layout_matches_diffusers(name):
  """The published configs: every key and shape equals diffusers' (built on the meta device), and the logical
  axes shard the big kernels over both fsdp and tensor on a (2, 2, 2) mesh."""
  config = FLUX_TRANSFORMERS[name]
  assert config is (FLUX1_DEV_TRANSFORMER if name == "flux1_dev" else FLUX1_SCHNELL_TRANSFORMER)
  with torch.device("meta"):
    ref = {k: tuple(v.shape) for k, v in TorchFlux(**config).state_dict().items()}
  model = abstract_flux_transformer(config, param_dtype=jnp.bfloat16)
  assert torch_shapes(model) == ref
  mesh = sharding.make_mesh((2, 2, 2))
  specs = jax.tree.map(lambda s: s.spec, sharding.model_shardings(model, mesh))
  block = specs["transformer_blocks"][0]
  assert block["norm1"]["linear"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert block["ff"]["net"][0]["proj"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert block["attn"]["to_out"][0]["kernel"] == jax.sharding.PartitionSpec("tensor", "fsdp")


def torch_shapes(model):
  """{PyTorch key: PyTorch shape} of a (possibly abstract) model: linear kernels are stored (out, in) there."""
  return {convert.torch_key(path): tuple(var.shape[::-1] if path[-1] == "kernel" else var.shape)
          for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
