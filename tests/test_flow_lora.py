"""LoRA on the flow transformers (training/lora.py on models/flux.py and models/sd3.py) against diffusers / PEFT.

Tiny pipeline folders written by diffusers (FluxPipeline, StableDiffusion3Pipeline `save_pretrained`), their
transformers loaded scanned (config.scan_blocks' default). Facts tested:
- targets select what PEFT selects (diffusers' train_dreambooth_lora_flux.py / _sd3.py default target_modules);
- the diffusers-format file (`transformer.` keys) loads with `pipe.load_lora_weights` to our outputs (float32 bar
  1e-4) and reads back; FLUX's kohya file (BFL module names: sd-scripts / ComfyUI) loads through diffusers' own
  converter (`FluxPipeline.lora_state_dict`, i.e. `_convert_kohya_flux_lora_to_diffusers`) to the same update as
  the diffusers file, on the tiny model and, for every module at FLUX.1's real widths (the converter hard-codes
  FLUX.1's fused single-block widths), on the abstract FLUX.1-dev layout;
- DPO's reference is the base with the adapters off: with trained-looking adapters the eval step's reference errors
  are the adapter-free model's;
- `python -m mapo_jax.export` (diffusers, kohya, --fuse) of a scanned LoRA run's checkpoint, the fused transformer
  in diffusers equal to the base plus the LoRA; `python -m mapo_jax.generate --lora` (and evaluate's model B)
  samples as diffusers' pipeline with the LoRA loaded.
"""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, rel_l2
from flax import nnx
from flow_fixtures import (flux_transformer_inputs, make_tiny_flux_pipeline, save_sd3_pipeline, sd3_pipeline_transformer,
                           sd3_transformer_inputs, sd3_transformer_torch)
from safetensors.numpy import load_file, save_file

from mapo_jax import config as config_lib
from mapo_jax import diffusion, generate, sharding
from mapo_jax.models import flux as flux_models
from mapo_jax.models.presets import FLUX1_DEV_TRANSFORMER, TINY_SD35_TRANSFORMER
from mapo_jax.pipelines import flux, sd3
from mapo_jax.training import lora

RANK, ALPHA = 4, 2.0  # scale 1/2: a reader that dropped alpha / r would be off by 2x
RTOL = 1e-4  # float32 forward passes against diffusers: the project's bar
EXTRA = {"flux": ("proj_mlp", "proj_out", "norm_out.linear"), "sd3": ("attn2.to_q", "ff.net.2")}
TARGETS = {"flux": lora.FLUX_TARGETS, "sd3": lora.SD3_TARGETS}
FAMILY = {"flux": flux, "sd3": sd3}
PROMPTS = ["a red cat", "the blue sky"]
SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """name -> (pipeline folder, the diffusers pipeline saved there): FLUX.1-dev-like (2 double, 2 single blocks) and
  SD3.5-medium-like without T5 (5 blocks: runs 0-1 with attn2, 2-3, and the last)."""
  out = {}
  path = tmp_path_factory.mktemp("lora_flux")
  out["flux"] = path, make_tiny_flux_pipeline(path, guidance_embeds=True, seed=3)
  path = tmp_path_factory.mktemp("lora_sd3")
  out["sd3"] = path, save_sd3_pipeline(path, sd3_pipeline_transformer(dict(TINY_SD35_TRANSFORMER, num_layers=5)),
                                       t5=False, seed=5)
  return out


def transformer_config(folder):
  return json.loads((folder / "transformer" / "config.json").read_text())


def inputs_of(name, folder, seed=0):
  config = transformer_config(folder)
  return (flux_transformer_inputs(config, seed) if name == "flux" else sd3_transformer_inputs(config, seed))


def torch_forward(name, transformer, inputs):
  if name == "sd3":
    return sd3_transformer_torch(transformer, inputs)
  with torch.no_grad():
    return transformer(**{k: torch.tensor(v) for k, v in inputs.items()}).sample.numpy()


def randomize_b(model, seed=0, scale=0.3):
  """Non-zero B everywhere (a fresh adapter's B is 0, which would hide a wrong layout or scale)."""
  rng = np.random.default_rng(seed)
  for adapter in lora.adapted(model).values():
    adapter.b.set_value(jnp.asarray(rng.standard_normal(adapter.b.shape) * scale, jnp.float32))
  return model


def adapted_model(name, folder, targets=None, scan=True):
  model = FAMILY[name].load_denoiser(folder, scan=scan)
  lora.add_adapters(model, rank=RANK, alpha=ALPHA, targets=targets or TARGETS[name] + EXTRA[name], seed=0)
  return randomize_b(model)


def updates(model) -> dict[str, np.ndarray]:
  """Every adapter's s · A B (in, out), by diffusers module name (a stacked adapter per block)."""
  return {name: np.asarray(a, np.float64) @ np.asarray(b, np.float64) * adapter.scale
          for name, a, b, adapter in lora._unrolled_adapters(model)}


def assert_same_updates(got, want, tol=1e-6):
  assert sorted(got) == sorted(want)
  for name in want:
    assert rel_l2(got[name], want[name]) <= tol, name


class Captured(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def load_in_diffusers(pipe, path):
  """pipe.load_lora_weights(file); fails on diffusers' warnings for keys that did not load."""
  captured = Captured()
  logger = logging.getLogger("diffusers")
  logger.addHandler(captured)
  try:
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
  finally:
    logger.removeHandler(captured)
  assert not [w for w in captured.messages if "unexpected keys" in w or "missing keys" in w], captured.messages


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_diffusers_format_loads_in_diffusers(folders, name, tmp_path):
  from peft import LoraConfig
  from peft.tuners.lora import LoraLayer
  folder, pipe = folders[name]
  ours = adapted_model(name, folder)
  # The recipes' targets select exactly the modules PEFT's LoraConfig(target_modules=...) adapts in diffusers' model.
  reference = type(pipe.transformer).from_pretrained(folder / "transformer")
  reference.add_adapter(LoraConfig(r=RANK, target_modules=list(TARGETS[name])))
  peft_names = {n for n, m in reference.named_modules() if isinstance(m, LoraLayer)}
  default = FAMILY[name].load_denoiser(folder, scan=True)
  lora.add_adapters(default, rank=RANK, alpha=ALPHA, targets=TARGETS[name], seed=0)
  assert {n for n, *_ in lora._unrolled_adapters(default)} == peft_names
  path = lora.save(ours, tmp_path)
  assert path.name == lora.DIFFUSERS_FILE and all(k.startswith("transformer.") for k in load_file(path))
  inputs = inputs_of(name, folder)
  mine = np.asarray(jit_call(ours, **inputs))
  base = torch_forward(name, pipe.transformer, inputs)
  load_in_diffusers(pipe, path)
  try:
    theirs = torch_forward(name, pipe.transformer, inputs)
  finally:
    pipe.unload_lora_weights()
  assert rel_l2(mine, theirs) <= RTOL
  assert rel_l2(base, theirs) > 100 * RTOL  # the adapters act
  # Read back: into the unrolled model, and into a LoRA run's own adapters (init_from: B = B' / s).
  unrolled = FAMILY[name].load_denoiser(folder)
  assert lora.load_into(unrolled, path) == sorted(updates(ours))
  assert_same_updates(updates(unrolled), updates(ours))
  cfg = config_lib.base_config().lora
  cfg.rank, cfg.alpha, cfg.targets, cfg.init_from = RANK, 4 * ALPHA, TARGETS[name] + EXTRA[name], str(path)
  run = FAMILY[name].load_denoiser(folder, scan=True)
  lora.from_config(run, cfg, seed=1)
  assert_same_updates(updates(run), updates(ours))
  if name == "sd3":
    with pytest.raises(ValueError, match="'kohya': not available for the SD3 transformer"):
      lora.save(ours, tmp_path, "kohya")


# Every module of FLUX's double blocks and the single blocks' linear2 / modulation: what diffusers' kohya converter
# maps at any width (its single-block linear1 split is FLUX.1's widths only: test_kohya_names_at_flux1_widths).
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2", "norm1.linear", "norm1_context.linear")
BLOCK_TARGETS = tuple(f"transformer_blocks.{i}.{m}" for i in range(2) for m in DOUBLE) + tuple(
    f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("proj_out", "norm.linear"))
# The modules outside the blocks (x_embedder, context_embedder, the three embedders, norm_out, proj_out).
OUTER_TARGETS = ("x_embedder", "context_embedder", "linear_1", "linear_2", "norm_out.linear", "proj_out")


def test_flux_kohya_loads_in_diffusers(folders, tmp_path):
  """The kohya file's update in diffusers (through its kohya converter) is the diffusers file's, and our reader
  reads it back to the same adapters. The block modules load with `load_lora_weights` itself; diffusers 0.42's
  converter names the modules outside the blocks without the `transformer.` prefix, so load_lora_weights drops
  them: they are checked through the converter with the prefix added."""
  from diffusers import FluxPipeline
  folder, pipe = folders["flux"]
  inputs = inputs_of("flux", folder, seed=1)
  base = torch_forward("flux", pipe.transformer, inputs)
  for targets in (BLOCK_TARGETS, OUTER_TARGETS):
    ours = adapted_model("flux", folder, targets)
    # One adapter with another scale (a fused qkv's slots then differ in scale).
    (ours.transformer_blocks.stack.attn.to_k if targets is BLOCK_TARGETS else ours.x_embedder).lora.scale = 0.75
    kohya = lora.save(ours, tmp_path / "kohya", "kohya")
    assert all(k.startswith("lora_unet_") for k in load_file(kohya))
    outputs = {}
    for fmt, path in (("diffusers", lora.save(ours, tmp_path / "diffusers")), ("kohya", kohya)):
      if targets is BLOCK_TARGETS:
        load_in_diffusers(pipe, path)
      else:
        state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
        state = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in state.items()}
        FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=pipe.transformer)
      try:
        outputs[fmt] = torch_forward("flux", pipe.transformer, inputs)
      finally:
        pipe.unload_lora_weights()
    assert rel_l2(outputs["kohya"], outputs["diffusers"]) <= 1e-6
    assert rel_l2(outputs["diffusers"], base) > 100 * RTOL  # the adapters act
    fresh = flux.load_denoiser(folder)
    lora.load_into(fresh, kohya)
    assert_same_updates(updates(fresh), updates(ours))
  assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in load_file(kohya)


def abstract_with_adapters(config, targets, seed, scales=None):
  """FLUX's layout at full size, abstract (no weights), with random concrete adapters on `targets`: the files'
  key mapping needs only the layers' shapes."""
  model = flux_models.abstract_flux_transformer(config, scan=True)
  rng = np.random.default_rng(seed)
  layers = lora.linear_layers(model)
  for name in lora.match_targets(model, targets):
    layer = layers[name]
    lead = layer.kernel.shape[:-2]
    fan_in, fan_out = layer.kernel.shape[-2:]
    a = rng.standard_normal((*lead, fan_in, 2)).astype(np.float32) / np.sqrt(fan_in)
    b = rng.standard_normal((*lead, 2, fan_out)).astype(np.float32)
    scale = (scales or {}).get(name.rsplit(".", 1)[-1], 0.75)
    layer.lora = nnx.data(lora.LoRA(a, b, scale, lora._axes(layer)))
  return model


@pytest.mark.parametrize("case", ["flux1_dev", "single_blocks_all_slots"])
def test_kohya_names_at_flux1_widths(case, tmp_path):
  """Our kohya file of the FLUX.1-dev layout (19 double, 38 single blocks; FLUX_TARGETS: q, k, v of the single
  blocks' fused linear1 without its MLP part) and of single blocks with all four linear1 slots (per-slot scales),
  through diffusers' `_convert_kohya_flux_lora_to_diffusers`: every module's update x·ΔW equals ours, the padding
  adds nothing; our reader gives back the same adapters at their own rank."""
  from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
  if case == "flux1_dev":
    model = abstract_with_adapters(FLUX1_DEV_TRANSFORMER, lora.FLUX_TARGETS, seed=0)
  else:
    model = abstract_with_adapters(dict(FLUX1_DEV_TRANSFORMER, num_layers=0, num_single_layers=2),
                                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), seed=1,
                                   scales={"to_k": 0.5, "proj_mlp": 2.0})
  ours = lora.diffusers_state_dict(model)  # lora_B holds s·B
  kohya = lora.kohya_state_dict(model)
  theirs = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in kohya.items()})
  theirs = {k: v.numpy() for k, v in theirs.items()}
  modules = lambda sd: {k[len("transformer."):-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")}
  assert modules(ours) <= modules(theirs)
  rng = np.random.default_rng(2)
  for module in modules(theirs):
    a_t, b_t = theirs[f"transformer.{module}.lora_A.weight"], theirs[f"transformer.{module}.lora_B.weight"]
    x = rng.standard_normal(a_t.shape[1])
    got = b_t.astype(np.float64) @ (a_t.astype(np.float64) @ x)
    if module not in modules(ours):  # a padded slot (proj_mlp beside q, k, v)
      assert module.endswith("proj_mlp") and not np.any(got)
      continue
    a, b = ours[f"transformer.{module}.lora_A.weight"], ours[f"transformer.{module}.lora_B.weight"]
    assert rel_l2(got, b.astype(np.float64) @ (a.astype(np.float64) @ x)) <= 1e-6, module
  save_file(kohya, tmp_path / "kohya.safetensors")
  back = lora.read(tmp_path / "kohya.safetensors", model)
  assert sorted(back) == sorted(modules(ours))
  for module, (a, b, _) in back.items():
    assert a.shape[1] == 2  # each slot its own rank-2 adapter (the block-diagonal layout splits back)
    a_o, b_o = ours[f"transformer.{module}.lora_A.weight"], ours[f"transformer.{module}.lora_B.weight"]
    np.testing.assert_allclose(a, a_o.T, rtol=0, atol=0)
    np.testing.assert_allclose(b, b_o.T, rtol=1e-6, atol=1e-7)


def test_dpo_reference_is_the_base_with_adapters_off(folders):
  """A LoRA DPO step's reference (train_step.make_loss_fn, `adapters_off_reference`) on the scanned FLUX transformer
  with trained-looking adapters: its errors are those of the model without any adapter (a MaPO evaluation, which
  has no reference, on the same draws), the policy's are not."""
  from mapo_jax.training.build import build
  folder, _ = folders["flux"]
  schedule = diffusion.as_schedule(flux.SCHEDULER_CONFIG)
  latents = flux.preset_latents(transformer_config(folder))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rng = np.random.default_rng(0)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  moments = lambda: np.concatenate([latents.shift + f(2, 4, 4, 16) / latents.scale, f(2, 4, 4, 16) - 3.0], -1)
  batch = dict(moments_w=moments(), moments_l=moments(), prompt_embeds=f(2, 5, 32), pooled_prompt_embeds=f(2, 16),
               time_ids=np.zeros((2, 6), np.float32))
  metrics = {}
  for objective, rank in (("dpo", RANK), ("mapo", 0)):
    config = config_lib.base_config()
    config.objective, config.global_batch_size, config.mesh = objective, 2, (1, 1, 1)
    config.lora.rank, config.lora.alpha, config.lora.targets = rank, ALPHA, lora.FLUX_TARGETS
    config.lora.base_dtype = config.ref_param_dtype = "float32"
    built = build(config, flux, flux.load_denoiser(folder, scan=True), None, schedule, latents, mesh)
    params = built.state.params
    if rank:  # trained adapters: B != 0
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype) if p[-1].key == "b" else x, params)
    placed = jax.device_put(batch, sharding.batch_sharding(mesh))
    metrics[objective] = jax.device_get(built.eval_step(params, placed, built.frozen))
  dpo, base = metrics["dpo"], metrics["mapo"]
  for side in ("w", "l"):
    # Two programs (the reference inside DPO's, the bare model in MaPO's): float32 reordering of the per-sample
    # means at most (tests/test_train_step.py's 2^-20 per sample).
    assert float(dpo[f"ref_mse_{side}"]) == pytest.approx(float(base[f"mse_{side}"]), rel=2 ** -18)
    assert abs(float(dpo[f"mse_{side}"]) - float(base[f"mse_{side}"])) > 1e-3 * float(base[f"mse_{side}"])


def checkpointed_lora_run(name, folder, workdir):
  """A scanned LoRA run's workdir as the trainer leaves it: its recorded config and a checkpoint (step 3) whose
  adapters are random (A and B)."""
  from mapo_jax.run import workdir as workdir_lib
  from mapo_jax.run.checkpoint import Checkpointer
  from mapo_jax.training import optim
  from mapo_jax.training.train_step import create_sharded_state
  model = FAMILY[name].load_denoiser(folder, scan=True)
  targets = TARGETS[name] + EXTRA[name]
  lora.add_adapters(model, rank=RANK, alpha=ALPHA, targets=targets, seed=0)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, state, *_ = create_sharded_state(model, optim.make_optimizer(optim.default_config()), mesh, seed=0,
                                      trainable=lora.LoRAParam)
  rng = np.random.default_rng(7)
  state = state.replace(params=jax.tree.map(lambda p: p + rng.standard_normal(p.shape).astype(np.float32) * 0.2,
                                            state.params))
  checkpointer = Checkpointer(workdir / "checkpoints")
  checkpointer.save(3, state)
  checkpointer.wait()
  checkpointer.close()
  config = config_lib.base_config()
  config.lora.rank, config.lora.alpha, config.lora.targets = RANK, ALPHA, targets
  assert config.scan_blocks
  workdir_lib.record_config(workdir, config.to_json(), 0)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_export_cli_and_generate_lora(folders, name, tmp_path):
  """export writes the run's adapters (diffusers; FLUX also kohya) and --fuse a pipeline whose transformer diffusers
  loads equal to the base plus the LoRA; generate --lora samples as diffusers' pipeline with the LoRA loaded, and
  evaluate's model B (--lora-b) is generate's."""
  from argparse import Namespace

  from mapo_jax import evaluate, export
  folder, pipe = folders[name]
  workdir = tmp_path / "run"
  checkpointed_lora_run(name, folder, workdir)
  run = lambda *args: export.main(export.parse_flags(["export", "--checkpoint", str(workdir), "--base", str(folder),
                                                      *args]))
  run("--out", str(tmp_path / "lora"))
  run("--out", str(tmp_path / "fused"), "--fuse")
  diffusers_file = tmp_path / "lora" / lora.DIFFUSERS_FILE
  trained, _ = export.load_checkpoint_denoiser(workdir, folder)
  if name == "flux":
    run("--out", str(tmp_path / "kohya"), "--format", "kohya")
    back = flux.load_denoiser(folder)
    lora.load_into(back, tmp_path / "kohya" / lora.KOHYA_FILE)
    assert_same_updates(updates(back), updates(trained))
  inputs = inputs_of(name, folder, seed=2)
  fused = type(pipe.transformer).from_pretrained(tmp_path / "fused" / "transformer")
  load_in_diffusers(pipe, diffusers_file)
  try:
    with_lora = torch_forward(name, pipe.transformer, inputs)
    # generate --lora from the same noise as diffusers' pipeline with the LoRA loaded.
    noise = np.random.default_rng(3).standard_normal((len(PROMPTS), SIZE // 8, SIZE // 8, 16)).astype(np.float32)
    theirs = diffusers_latents(name, pipe, noise)
  finally:
    pipe.unload_lora_weights()
  assert rel_l2(torch_forward(name, fused, inputs), with_lora) <= RTOL
  assert rel_l2(np.asarray(jit_call(trained, **inputs)), with_lora) <= RTOL
  np.save(tmp_path / "noise.npy", noise)
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  guidance = "3.5" if name == "flux" else "4.0"
  generate.main(generate.parse_flags([
      "generate", "--model", str(folder), "--lora", str(diffusers_file), "--prompts", str(tmp_path / "prompts.txt"),
      "--out", str(tmp_path / "samples"), "--steps", str(STEPS), "--guidance", guidance, "--height", str(SIZE),
      "--width", str(SIZE), "--init-latents", str(tmp_path / "noise.npy"),
      "--output-latents", str(tmp_path / "latents.npy")]))
  assert rel_l2(np.load(tmp_path / "latents.npy"), theirs) <= RTOL
  if name == "flux":  # evaluate --lora-b samples B through the same loader: generate's images from the same seeds
    args = Namespace(negative_prompt=None, max_sequence_length=0, steps=STEPS, guidance=float(guidance), seed=0, height=SIZE, width=SIZE,
                     sampler="euler", batch_size=8, true_cfg=1.0)
    images = evaluate.sample(str(folder), PROMPTS, args, str(diffusers_file))
    generate.main(generate.parse_flags([
        "generate", "--model", str(folder), "--lora", str(diffusers_file), "--prompts", str(tmp_path / "prompts.txt"),
        "--out", str(tmp_path / "seeded"), "--steps", str(STEPS), "--guidance", guidance, "--height", str(SIZE),
        "--width", str(SIZE)]))
    from PIL import Image
    for i, image in enumerate(images):
      np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / "seeded" / f"{i:04d}.png")))


def diffusers_latents(name, pipe, noise):
  """The diffusers pipeline's final latents (NHWC) from our NHWC unit-variance noise, at the guidance generate is
  given (FLUX: the embedded 3.5; SD3: classifier-free 4.0)."""
  b, h, w, c = noise.shape
  start = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    if name == "flux":
      from diffusers import FluxPipeline
      packed = FluxPipeline._pack_latents(start, b, c, h, w)
      out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=packed,
                 guidance_scale=3.5, output_type="latent").images
      return FluxPipeline._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor).numpy().transpose(0, 2, 3, 1)
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE, latents=start,
               output_type="latent").images
    return out.numpy().transpose(0, 2, 3, 1)


def test_files_for_other_models_are_refused(tmp_path):
  """A UNet's file, a text encoder's adapters, BFL modules the model lacks and an SD3 kohya file fail naming the
  key (the layouts alone: abstract models)."""
  model = flux_models.abstract_flux_transformer(dict(FLUX1_DEV_TRANSFORMER, num_layers=1, num_single_layers=1))
  medium = sd3.abstract_denoiser(dict(TINY_SD35_TRANSFORMER, num_layers=5), scan=True)
  zeros = lambda *shape: np.zeros(shape, np.float32)
  cases = [
      (model, {"unet.transformer_blocks.0.attn.to_q.lora_A.weight": zeros(2, 3072)},
       r"key 'unet\.transformer_blocks\.0\.attn\.to_q\.lora_A\.weight' is not a diffusers FLUX transformer LoRA key"),
      (model, {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": zeros(2, 8)},
       r"a text-encoder adapter \(not supported: only the FLUX transformer's\)"),
      (model, {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": zeros(6, 3072)},
       r"names module 'lora_unet_double_blocks_7_img_attn_qkv', which is not a linear layer"),
      (model, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": zeros(6, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": zeros(3 * 3072 + 1, 6)},
       r"lora_up has 9217 rows, this model's fused layer 9216 \(3072 \+ 3072 \+ 3072\)"),
      (medium, {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": zeros(2, 32)},
       r"is a kohya file \(lora_unet_\* keys\); the SD3 transformer reads only the diffusers format"),
  ]
  for i, (target, tensors, message) in enumerate(cases):
    save_file(tensors, tmp_path / f"{i}.safetensors")
    with pytest.raises(lora.LoRAFileError, match=message):
      lora.read(tmp_path / f"{i}.safetensors", target)
