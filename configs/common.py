"""The base config every recipe file starts from: every key with its default, written out once.

A recipe file (sdxl_mapo.py, sdxl_dpo.py, ...) calls `base_config()` and overrides a few keys.
Defaults are the official MaPO recipe (shared/NOTES.md): AdamW lr 1e-5 constant, no warmup, clip 1.0,
2000 steps, 8 pairs per GPU x 2 accumulation steps on 8 GPUs = 128 pairs per optimizer step, 1024 px.
`mapo_jax.config.validate` checks every value before anything compiles.
"""
import ml_collections

from mapo_jax import optim


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Models: local diffusers pipeline folders. `reference` ("" = the pipeline) is the frozen model of
  # DPO / RPO; MaPO and SFT load none.
  config.pipeline = ""
  config.reference = ""

  # Data. mode "cached": batches from `python -m mapo_jax.encode --out {cache_dir}`; "onthefly": decode
  # and encode `source` (parquet file/folder or JSONL) every step, for small datasets.
  config.data = ml_collections.ConfigDict(dict(
      mode="cached", cache_dir="", source="", random_crop=False, rpo_embedding="pooled", num_threads=8))
  config.resolution = 1024

  # Objective: `objective` picks one; its hyper-parameters live in the block of the same name.
  config.objective = "mapo"
  config.mapo = ml_collections.ConfigDict(dict(beta=0.1, snr=0.5))  # MaPO official: beta 0.1, snr_value 0.5
  config.dpo = ml_collections.ConfigDict(dict(beta=5000.0))  # Diffusion-DPO official beta_dpo
  config.rpo = ml_collections.ConfigDict(dict(beta=5000.0, tau=0.5))

  # Steps and batch. global_batch_size counts preference pairs per optimizer step over all devices and
  # accumulation steps (official MaPO: 8 per GPU x 2 accumulation x 8 GPUs = 128).
  steps = ml_collections.FieldReference(2000)
  config.steps = steps
  config.global_batch_size = 128
  config.accum_steps = 2

  config.optim = optim.default_config()  # AdamW (0.9, 0.999, 1e-8, wd 1e-2), lr 1e-5 constant, clip 1.0
  config.optim.total_steps = steps  # a cosine schedule decays over the whole run

  # Parallelism: (data, fsdp, tensor), one entry -1 = the remaining devices. Default: ZeRO-3 over all.
  config.mesh = (1, -1, 1)

  # Numerics: compute in bf16 on float32 master parameters; the frozen reference is stored in bf16.
  config.dtype = "bfloat16"
  config.param_dtype = "float32"
  config.ref_param_dtype = "bfloat16"
  config.attention = ""  # "" = the backend default (cudnn on GPU, pallas on TPU, einsum on CPU)
  config.remat = "full"  # rematerialisation policy of each UNet block (models/unet.py REMAT_POLICIES)
  config.seed = 0

  # Logging, checkpoints, samples and export.
  config.log_every = 10
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.sample_every = 250  # 0: never
  config.sample_prompts = (
      "a photo of a red fox in the snow, highly detailed",
      "an astronaut riding a horse on the moon, digital art",
      "a bowl of ramen on a wooden table, studio lighting",
      "a watercolor painting of a lighthouse at sunset",
  )
  config.sample_steps = 25
  config.sample_guidance = 5.0
  config.export_dtype = "fp16"  # fp32 | fp16 | bf16, the UNet weights written to WORKDIR/export

  # Demo only: a folder where `mapo_jax.demo` writes its tiny pipeline, dataset and cache if missing.
  config.demo_assets = ""
  return config
