"""The training config: `base_config()` with every key and its default, and `validate`, which checks a
config before anything is loaded or compiled and names the offending key.

Recipe files in configs/ call `base_config()` and override a few keys. Defaults are the official MaPO
recipe (docs/recipes.md): AdamW lr 1e-5 constant, no warmup, clip 1.0, 2000 steps, 1024 px, 8 pairs per
GPU x 2 accumulation steps on 8 GPUs = 128 pairs per optimizer step (`global_batch_size`), except the VAE
(default the pipeline's; configs/sdxl_mapo.py names the fp16-safe one the recipe uses).
"""
from __future__ import annotations

import difflib
import math
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections

from mapo_jax import diffusion, sharding
from mapo_jax.toy import judging
from mapo_jax.training import objectives
from mapo_jax.training import optim
from mapo_jax.convert.files import EXPORT_DTYPES
from mapo_jax.models.attention import IMPLEMENTATIONS
from mapo_jax.models.layers import REMAT_POLICIES
from mapo_jax.run.metrics import WANDB_MODES

DATA_MODES = ("cached", "onthefly")
TIME_IDS = ("original", "fixed")
# The fp16-safe SDXL VAE (madebyollin/sdxl-vae-fp16-fix) that both official SDXL recipes encode with; the
# recipes name this folder, override it with --config.vae=DIR.
SDXL_FP16_FIX_VAE = "/models/sdxl-vae-fp16-fix"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
  """A command line that cannot run (a missing flag)."""


class ConfigError(ValueError):
  """A bad config value; the message starts with the key (`config.optim.lr: ...`)."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config.{key}: {message}")
    self.key = key


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Models: local diffusers pipeline folders. `reference` ("" = the pipeline) is the frozen model of
  # DPO / RPO; MaPO and SFT load none.
  config.pipeline = ""
  config.reference = ""
  # A VAE folder (diffusers layout: config.json + weights, or a pipeline folder with vae/) used instead of
  # the pipeline's vae/ for on-the-fly encoding, sample grids and the latent normalisation; "" = the
  # pipeline's. A cache must have been encoded by the same VAE (`encode --vae`, recorded in its manifest).
  config.vae = ""
  # T5 tokens per prompt in the families that have a T5 tower (FLUX.1, SD3): the pipelines' and the training
  # scripts' `max_sequence_length`; 0 = the family's default (FluxPipeline 512, StableDiffusion3Pipeline 256). Prompts
  # are encoded at it for training (a cache must be encoded at it too: `encode --max_sequence_length`), sample
  # grids and the judge. Must stay 0 for SD / SDXL.
  config.max_sequence_length = 0

  # Data. mode "cached": batches from `python -m mapo_jax.encode --out {cache_dir}`; "onthefly": decode
  # and encode `source` (parquet file/folder or JSONL) every step, for small datasets.
  # empty_prompt_prob: each pair's caption is replaced by the empty prompt "" with this probability (the
  # official Diffusion-DPO `--proportion_empty_prompts`), drawn in the step from the step's key.
  # time_ids: SDXL micro-conditioning, "original" = the cache's [orig_H, orig_W, top, left, res, res];
  # "fixed" = [res, res, 0, 0, res, res] for every pair, as the official Diffusion-DPO trainer.
  # label_noise_prob: each pair's winner and loser are swapped with this probability (the official MaPO
  # `--label_noise_prob`), drawn in the step from the step's key.
  # eval_pairs: held-out pairs (a fixed seeded subset, never trained on) whose objective loss and accuracy
  # are logged every log_every steps as eval_loss / eval_accuracy, with the same noise each time; 0 = off.
  config.data = ml_collections.ConfigDict(dict(
      mode="cached", cache_dir="", source="", random_crop=False, rpo_embedding="pooled", num_threads=8,
      empty_prompt_prob=0.0, time_ids="original", label_noise_prob=0.0, eval_pairs=0))
  config.resolution = 1024

  # Objective: `objective` picks one; its hyper-parameters live in the block of the same name, with the
  # defaults that objectives.OBJECTIVES gives them. DSPO has one beta per form, as its launchers set them:
  # `dspo.form` picks which of `dspo.beta_sd15` (0.001) and `dspo.beta_sdxl` (5000) applies.
  config.objective = "mapo"
  for name, objective in objectives.OBJECTIVES.items():
    if objective.defaults:
      config[name] = ml_collections.ConfigDict(objective.defaults)
  # objective_safeguard: "" or a wrapper around a paired objective ("sdpo": Diffusion-SDPO's loser-gradient
  # scale), with its hyper-parameters in the block of the same name (docs/objectives.md).
  config.objective_safeguard = ""
  for name, defaults in objectives.SAFEGUARDS.items():
    config[name] = ml_collections.ConfigDict(defaults)
  # min_snr_gamma > 0: every per-sample error weighted by min(SNR(t), gamma) / SNR(t) (v targets:
  # / (SNR(t) + 1)) before the objective; 0 = off. ema_decay in [0, 1): the train state keeps
  # ema <- decay * ema + (1 - decay) * params, checkpointed (`export --ema` writes it); < 0 = no EMA.
  config.min_snr_gamma = 0.0
  config.ema_decay = -1.0
  # Flow matching (FLUX.1, SD3 / SD3.5: a FlowMatchEulerDiscreteScheduler pipeline; docs/objectives.md "Flow
  # matching"). weighting_scheme: diffusers' `--weighting_scheme`, which drives both the density of the training
  # sigmas and the per-sample loss weights: "logit_normal" (sigma looked up at u = sigmoid(N(logit_mean,
  # logit_std^2))) and "mode" (SD3's mode density, mode_scale) weigh 1; "sigma_sqrt" (sigma^-2) and "cosmap"
  # (2 / (pi (1 - 2 sigma + 2 sigma^2))) draw u uniformly and weigh; "none" (or "uniform") neither. Its default
  # here is train_dreambooth_lora_flux.py's ("none"); train_dreambooth_lora_sd3.py's is "logit_normal" (the SD3
  # recipes set it). guidance: the embedded guidance scale a guidance-distilled transformer (FLUX.1-dev) is
  # trained at, train_dreambooth_lora_flux.py's `--guidance_scale` default; models without a guidance input
  # ignore it. On a DDPM schedule these keys must keep their defaults, and min_snr_gamma / data.time_ids "fixed"
  # (DDPM / SDXL only) fail on a flow-matching one (`validate_for_schedule`).
  config.flow = ml_collections.ConfigDict(dict(
      weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, guidance=3.5))

  # Steps and batch. global_batch_size: preference pairs per optimizer step over all devices and
  # accumulation steps (official MaPO: 8 per GPU x 2 accumulation x 8 GPUs = 128, 64 per micro-batch).
  steps = ml_collections.FieldReference(2000)
  config.steps = steps
  config.global_batch_size = 128
  config.accum_steps = 2

  config.optim = optim.default_config()  # AdamW (0.9, 0.999, 1e-8, wd 1e-2), lr 1e-5 constant, clip 1.0
  config.optim.total_steps = steps  # a cosine schedule decays over the whole run

  # Parallelism: (data, fsdp, tensor) mesh sizes, one may be -1 (the remaining devices). Default: ZeRO-3.
  config.mesh = (1, -1, 1)

  # Numerics: compute in bf16 on float32 master parameters; the frozen reference is stored in bf16.
  config.dtype = "bfloat16"
  config.param_dtype = "float32"
  config.ref_param_dtype = "bfloat16"
  # LoRA (mapo_jax/training/lora.py, docs/lora.md): rank 0 = full fine-tune. rank > 0 trains only adapters on the
  # linear layers `targets` select (PEFT target_modules rule), scaled by alpha / rank; the base stays frozen in
  # `base_dtype`, and DPO/RPO's reference is the base with the adapters switched off (no second UNet).
  # init_from: a diffusers or kohya LoRA file to start from (same targets and rank). alpha 8 is PEFT's
  # LoraConfig default; dropout is PEFT's lora_dropout (on the adapters' inputs, training steps only).
  config.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0, init_from="",
      base_dtype="bfloat16"))
  config.attention = ""  # "" = the backend's default (cudnn on GPU, pallas on TPU, einsum on CPU)
  # XLA's persistent compilation cache ("" = off): a restart (preemption, resume) loads the compiled train step
  # instead of compiling it again. A local folder per host (multi-host: each host keeps its own).
  config.compile_cache = "~/.cache/mapo_jax/xla"
  config.remat = "full"  # rematerialisation policy of each UNet block (models/unet.py REMAT_POLICIES)
  # Stacks of identical transformer blocks (SDXL: three ten-deep stacks) run as one jax.lax.scan over stacked
  # parameters (models/layers.py ScannedBlocks): the same step, compiled once per stack instead of per block.
  # Checkpoints then hold each stack's parameters stacked; exported files keep the diffusers layout.
  config.scan_blocks = True
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
  # Judged samples (mapo_jax/toy/judging.py): "" = none, else a judge in judging.JUDGES that reads samples of
  # judge_prompts (each judge_samples_per_prompt times, fixed seeds, the sample_* settings) at step 0, every
  # judge_every steps (0: only then and at the end) and at the last step.
  config.judge = ""
  config.judge_every = 0
  config.judge_prompts = ()
  config.judge_samples_per_prompt = 8
  config.export_dtype = "fp16"  # UNet weights written to WORKDIR/export
  # Weights & Biases (optional extra `wandb`): off while `project` is "". It records what metrics.jsonl holds,
  # the sample and judge grids and the resolved config; a restart resumes the same W&B run (mapo_jax/run/metrics.py).
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", tags=(), mode="online"))

  # Divergence guards: the run stops (non-zero exit, no export) when more than this fraction of the last
  # 100 steps skipped their update for a non-finite loss or gradient, and export refuses parameters that
  # are not finite or whose global norm grew past `max_param_norm_ratio` times the initial model's.
  config.max_skipped_fraction = 0.1
  config.max_param_norm_ratio = 10.0
  # Faults of a pod: a process that stops answering (crash, preemption) is declared lost after peer_timeout_s
  # without a heartbeat (jax.distributed's), and every other process then exits non-zero naming it; a checkpoint
  # save that has not finished after save_timeout_s (a stalled GCS-FUSE or NFS workdir) stops the run.
  config.peer_timeout_s = 100
  config.save_timeout_s = 900

  # Demo only: a folder where `mapo_jax.toy.demo` creates its tiny pipeline, dataset and cache if missing, from
  # the toy base `demo_base` ("sdxl": mapo_jax/toy/base; "flux": its FLUX.1 twin, mapo_jax/toy/flux_base).
  config.demo_assets = ""
  config.demo_base = "sdxl"
  return config


def use_dpo_recipe(config: ml_collections.ConfigDict, objective: str = "dpo", *, sdxl: bool = True
                   ) -> ml_collections.ConfigDict:
  """The official Diffusion-DPO recipe (SalesforceAIResearch/DiffusionDPO `launchers/sdxl.sh`,
  `launchers/sd15.sh`, `train.py`); configs/sdxl_dpo.py and configs/sd15_dpo.py list every value.

  Both launchers: 2048 pairs per step (1 per GPU x 128 accumulation x 16 GPUs), `--learning_rate=1e-8
  --scale_lr` (lr x 2048 = 2.048e-5), constant_with_warmup, 2000 steps, beta_dpo 5000, 20 % empty prompts
  (`--proportion_empty_prompts` default 0.2), gradient clipping at `--max_grad_norm` 1.0.
  sdxl.sh: 200 warmup steps; `--sdxl` forces transformers' Adafactor (train.py `if args.use_adafactor or
  args.sdxl`); time ids fixed at [res, res, 0, 0, res, res]; the fp16-safe VAE. The global-norm clip is
  skipped only under `--use_adafactor` (train.py `if not args.use_adafactor`), which sdxl.sh does not
  pass, so the SDXL run clips too.
  sd15.sh: 500 warmup steps, torch AdamW (0.9, 0.999, 1e-8, wd 1e-2), the pipeline's VAE.
  Shared by the DPO and RPO recipes."""
  config.objective = objective
  config.global_batch_size = 2048
  config.optim.lr = 1e-8 * config.global_batch_size
  config.optim.schedule = "linear_warmup"  # = constant_with_warmup
  config.optim.warmup_steps = 200 if sdxl else 500
  config.optim.clip_norm = 1.0
  config.data.empty_prompt_prob = 0.2
  if sdxl:
    config.optim.name = "adafactor"
    config.data.time_ids = "fixed"
    config.vae = SDXL_FP16_FIX_VAE
  return config


def underscore_dashed_flags(argv: list[str], dashed: tuple[str, ...]) -> list[str]:
  """--stop-after-step[=K] → --stop_after_step[=K] for the names in `dashed`: the dashed spellings are the
  documented ones, absl knows underscores only."""
  out = []
  for arg in argv:
    name, sep, value = arg.partition("=")
    if name.startswith("--") and name[2:] in dashed:
      arg = "--" + name[2:].replace("-", "_") + sep + value
    out.append(arg)
  return out


RECIPES = Path(__file__).resolve().parent / "configs"  # the recipes that ship with the package


def recipe_names() -> list[str]:
  return sorted(p.stem for p in RECIPES.glob("*.py") if not p.name.startswith("_"))


def resolve_config_path(spec: str) -> str | None:
  """`--config`'s value as a file path: an existing file as given (FILE or FILE:ARG), else a recipe name
  (`sdxl_mapo`, `demo`, with or without `.py`) of the packaged recipes; None if it is neither."""
  path, sep, arg = spec.partition(":")
  if Path(path).is_file():
    return spec
  name = path.removesuffix(".py")
  if os.sep not in path and (RECIPES / f"{name}.py").is_file():  # a bare name: a packaged recipe
    return str(RECIPES / f"{name}.py") + sep + arg
  return None


def parse_command_line(argv: list[str], *, dashed: tuple[str, ...], doc: str) -> list[str]:
  """absl flag parsing for the programs that take `--config` (train, aot), with errors a user can act on:
  a missing or absent config file, an unknown `--config.KEY` (with the nearest keys), and `--help` that
  lists the packaged recipes and every config key with its default. `--config` takes a file or a recipe
  name (`--config sdxl_mapo`). Errors print one line and exit 2."""
  from absl import flags  # the programs' flags are defined in their own modules
  argv = underscore_dashed_flags(argv, dashed)
  args = argv[1:]
  if any(a in ("--help", "-h", "--helpshort", "-?", "--helpfull") for a in args):
    print(doc)
    print(flags.FLAGS.main_module_help())
    print(f"\nrecipes (--config NAME, or a file): {', '.join(recipe_names())} ({RECIPES})")
    print("\nconfig keys (override any with --config.KEY=VALUE), with their defaults:")
    print("\n".join(f"  config.{k} = {v!r}" for k, v in flatten(base_config()).items()))
    sys.exit(0)

  def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

  positions = [(i + 1, args[i + 1]) if a == "--config" and i + 1 < len(args) else (i, a.partition("=")[2])
               for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")]
  if not positions:
    fail("--config is required: a recipe name or a config file, e.g. --config demo or --config configs/demo.py")
  index, spec = positions[-1]
  resolved = resolve_config_path(spec)
  if resolved is None:
    fail(f"--config {spec}: no such file, nor a recipe name (recipes: {', '.join(recipe_names())})")
  args[index] = resolved if args[index] == spec else f"--config={resolved}"
  argv = argv[:1] + args
  known = flatten(base_config())
  for a in args:
    if a.startswith("--config."):
      key = a[len("--config."):].partition("=")[0]
      if key not in known and not any(k.startswith(key + ".") for k in known):
        fail(unknown_key_message(key))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def unknown_key_message(key: str) -> str:
  """`config.KEY: unknown key`, with the nearest known keys (for typos on the command line)."""
  schema = sorted(flatten(base_config()))
  near = difflib.get_close_matches(key, schema, n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join('config.' + k for k in near)}?" if near else ""
  return f"config.{key}: unknown key{hint} (`python -m mapo_jax.train --help` lists every key)"


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _same_type(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key: unknown or missing keys, wrong types, enums, ranges.

  Checks that need the device count (mesh, batch divisibility) are in `validate_for_devices`.
  """
  given, schema = flatten(config), flatten(base_config())
  for key in given:
    if key not in schema:
      raise ConfigError(key, unknown_key_message(key).split(": ", 1)[1])
  for key, default in schema.items():
    if key not in given:
      raise ConfigError(key, "missing")
    if not _same_type(given[key], default):
      raise ConfigError(key, f"{given[key]!r} is a {type(given[key]).__name__}, expected {type(default).__name__}")

  def choice(key, allowed):
    if given[key] not in allowed:
      raise ConfigError(key, f"{given[key]!r} is not one of {tuple(allowed)}")

  def at_least(key, low):
    if not given[key] >= low:
      raise ConfigError(key, f"{given[key]!r} must be >= {low}")

  choice("objective", tuple(objectives.OBJECTIVES))
  choice("objective_safeguard", ("",) + tuple(objectives.SAFEGUARDS))
  choice("dpo.loss_type", objectives.DPO_LOSS_TYPES)
  choice("dspo.form", objectives.DSPO_FORMS)
  choice("demo_base", ("sdxl", "flux"))  # mapo_jax/toy/demo.py BASES
  if given["objective_safeguard"] and not objectives.get_objective(given["objective"]).paired:
    raise ConfigError("objective_safeguard", f"{given['objective_safeguard']!r} scales the loser's gradient; "
                      f"objective {given['objective']!r} has no loser")
  if not given["sdpo.mu"] <= 1 or not given["sdpo.mu"] >= 0:
    raise ConfigError("sdpo.mu", f"{given['sdpo.mu']!r} must be in [0, 1]")
  if not given["ema_decay"] < 1:
    raise ConfigError("ema_decay", f"{given['ema_decay']!r} must be < 1 (in [0, 1) keeps an EMA, < 0 keeps none)")
  at_least("min_snr_gamma", 0)
  choice("flow.weighting_scheme", diffusion.FLOW_WEIGHTINGS)
  if not math.isfinite(given["flow.logit_mean"]):
    raise ConfigError("flow.logit_mean", f"{given['flow.logit_mean']!r} must be finite")
  if not (given["flow.logit_std"] > 0 and math.isfinite(given["flow.logit_std"])):
    raise ConfigError("flow.logit_std", f"{given['flow.logit_std']!r} must be finite and > 0")
  # SD3 paper (arXiv 2403.03206) eq. 20: the mode density is a monotone map of u only for -1 <= s <= 2 / (pi - 2).
  if not -1 <= given["flow.mode_scale"] <= 2 / (math.pi - 2):
    raise ConfigError("flow.mode_scale", f"{given['flow.mode_scale']!r} must be in [-1, 2 / (pi - 2) = "
                      f"{2 / (math.pi - 2):.4f}] (SD3 paper eq. 20)")
  if not (given["flow.guidance"] >= 0 and math.isfinite(given["flow.guidance"])):
    raise ConfigError("flow.guidance", f"{given['flow.guidance']!r} must be a finite scale >= 0")
  choice("data.mode", DATA_MODES)
  choice("data.rpo_embedding", objectives.RPO_EMBEDDINGS)
  choice("data.time_ids", TIME_IDS)
  for key in ("dtype", "param_dtype", "ref_param_dtype", "lora.base_dtype"):
    choice(key, DTYPES)
  choice("attention", ("",) + IMPLEMENTATIONS)
  choice("remat", tuple(REMAT_POLICIES))
  choice("optim.name", optim.OPTIMIZERS)
  choice("optim.schedule", optim.SCHEDULES)
  choice("optim.mu_dtype", ("",) + DTYPES)
  if given["optim.mu_dtype"] and given["optim.name"] != "adamw":
    raise ConfigError("optim.mu_dtype", f"{given['optim.mu_dtype']!r}: only adamw keeps a first moment to store "
                      f"in another dtype (optim.name={given['optim.name']!r})")
  choice("export_dtype", EXPORT_DTYPES)
  choice("wandb.mode", WANDB_MODES)
  if not all(isinstance(t, str) and t for t in given["wandb.tags"]):
    raise ConfigError("wandb.tags", f"{given['wandb.tags']!r} must be non-empty strings")
  for key in ("steps", "global_batch_size", "accum_steps", "log_every", "checkpoint_every", "peer_timeout_s",
              "save_timeout_s",
              "keep_checkpoints", "sample_steps", "data.num_threads", "optim.total_steps"):
    at_least(key, 1)
  for key in ("data.empty_prompt_prob", "data.label_noise_prob"):
    if not 0 <= given[key] <= 1:
      raise ConfigError(key, f"{given[key]!r} must be in [0, 1]")
  for key in ("dmpo.alpha", "kto.lambda_d", "kto.lambda_u"):
    at_least(key, 0)
  if given["data.label_noise_prob"] > 0 and not objectives.get_objective(given["objective"]).paired:
    raise ConfigError("data.label_noise_prob", f"objective {given['objective']!r} trains on winners only: "
                      "there is no loser to swap")
  for key in ("data.eval_pairs", "sample_every", "optim.warmup_steps", "optim.clip_norm", "optim.weight_decay",
              "seed"):
    at_least(key, 0)
  for key in ("optim.lr", "optim.eps", "mapo.beta", "mapo.snr", "dpo.beta", "rpo.beta", "rpo.tau", "dmpo.beta",
              "dspo.beta_sd15", "dspo.beta_sdxl", "smpo.beta", "smpo.k", "smpo.score_scale", "kto.beta",
              "sdpo.max_lambda"):
    if not given[key] > 0:
      raise ConfigError(key, f"{given[key]!r} must be > 0")
  validate_lora(given)
  if not 0 <= given["max_skipped_fraction"] <= 1:
    raise ConfigError("max_skipped_fraction", f"{given['max_skipped_fraction']!r} must be in [0, 1]")
  if not given["max_param_norm_ratio"] > 1:
    raise ConfigError("max_param_norm_ratio", f"{given['max_param_norm_ratio']!r} must be > 1")
  if given["judge"]:
    choice("judge", tuple(judging.JUDGES))
    at_least("judge_every", 0)
    at_least("judge_samples_per_prompt", 1)
    if not given["judge_prompts"]:
      raise ConfigError("judge_prompts", f"is empty, but judge={given['judge']!r} judges samples of them: give "
                        "prompts, or set judge=''")
  if given["sample_every"] > 0 and not given["sample_prompts"]:
    raise ConfigError("sample_prompts", "is empty, but sample_every > 0 draws sample grids: give prompts, "
                      "or set sample_every=0")
  for key in ("optim.b1", "optim.b2"):
    if not 0 <= given[key] < 1:
      raise ConfigError(key, f"{given[key]!r} must be in [0, 1)")
  if not 0 <= given["max_sequence_length"] <= 512:
    raise ConfigError("max_sequence_length", f"{given['max_sequence_length']!r} must be in [1, 512] T5 tokens, "
                      "or 0 for the family's default")
  if given["resolution"] < 8 or given["resolution"] % 8:
    raise ConfigError("resolution", f"{given['resolution']} must be a positive multiple of 8 (the VAE's /8)")
  if given["global_batch_size"] % given["accum_steps"]:
    raise ConfigError("global_batch_size", f"{given['global_batch_size']} pairs do not split into "
                      f"accum_steps={given['accum_steps']} equal micro-batches")
  try:
    sharding.check_mesh_shape(given["mesh"])
  except ValueError as e:
    raise ConfigError("mesh", str(e)) from None
  if not given["pipeline"] and not given["demo_assets"]:
    raise ConfigError("pipeline", "set it to a local diffusers pipeline folder")
  if given["data.mode"] == "cached" and not given["data.cache_dir"]:
    raise ConfigError("data.cache_dir", "data.mode='cached' needs the folder written by mapo_jax.encode")
  if given["data.mode"] == "onthefly" and not given["data.source"]:
    raise ConfigError("data.source", "data.mode='onthefly' needs a parquet file/folder or a .jsonl file")


def validate_lora(given: dict[str, Any]) -> None:
  """config.lora.*: rank >= 0, alpha > 0, targets non-empty, dropout in [0, 1), init_from an existing file."""
  if not given["lora.rank"] >= 0:
    raise ConfigError("lora.rank", f"{given['lora.rank']!r} must be >= 0 (0 = full fine-tune)")
  if not given["lora.alpha"] > 0:
    raise ConfigError("lora.alpha", f"{given['lora.alpha']!r} must be > 0 (the adapters' scale is alpha / rank)")
  if not given["lora.targets"] or not all(isinstance(t, str) and t for t in given["lora.targets"]):
    raise ConfigError("lora.targets", f"{given['lora.targets']!r} must be module names, e.g. to_q, to_out.0")
  if not 0 <= given["lora.dropout"] < 1:
    raise ConfigError("lora.dropout", f"{given['lora.dropout']!r} must be in [0, 1)")
  if given["lora.init_from"]:
    if not given["lora.rank"]:
      raise ConfigError("lora.init_from", "needs lora.rank > 0 (the rank of the file's adapters)")
    if not Path(given["lora.init_from"]).is_file():
      raise ConfigError("lora.init_from", f"{given['lora.init_from']!r} is not a file (a .safetensors LoRA)")


def validate_for_schedule(config: ml_collections.ConfigDict, schedule) -> None:
  """Keys that apply to one kind of noise schedule only (`schedule.is_flow`, from the pipeline's scheduler config):
  on a flow-matching schedule min_snr_gamma (DDPM's SNR) and data.time_ids "fixed" (SDXL's micro-conditioning)
  fail; on a DDPM schedule every config.flow key must keep its default. Raises ConfigError naming the key."""
  if schedule.is_flow:
    if config.min_snr_gamma > 0:
      raise ConfigError("min_snr_gamma", f"{config.min_snr_gamma!r}: min-SNR weights come from a DDPM schedule's "
                        "alphas; this pipeline's scheduler is flow matching: weigh with config.flow.weighting_scheme")
    if config.data.time_ids == "fixed":
      raise ConfigError("data.time_ids", "'fixed' sets SDXL's micro-conditioning; this flow-matching pipeline's "
                        "model takes no time ids: use 'original'")
    return
  defaults = base_config().flow
  for key, default in defaults.items():
    if config.flow[key] != default:
      raise ConfigError(f"flow.{key}", f"{config.flow[key]!r}: config.flow applies to flow-matching schedules "
                        f"only; this pipeline's scheduler is DDPM ({schedule.kind}); leave it at {default!r}")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """config.mesh with its -1 resolved for `num_devices`."""
  try:
    return sharding.resolve_mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError("mesh", str(e)) from None


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  """The batch must split evenly over processes, batch-sharding devices (data x fsdp) and micro-batches."""
  data, fsdp, _ = mesh_shape(config, num_devices)
  unit = data * fsdp * config.accum_steps
  if config.global_batch_size % unit:
    raise ConfigError("global_batch_size", f"{config.global_batch_size} is not a multiple of data x fsdp x "
                      f"accum_steps = {data} x {fsdp} x {config.accum_steps} = {unit}")
  if config.global_batch_size % process_count:
    raise ConfigError("global_batch_size", f"{config.global_batch_size} does not split over {process_count} processes")
  micro = config.global_batch_size // config.accum_steps
  if config.data.eval_pairs % micro:
    raise ConfigError("data.eval_pairs", f"{config.data.eval_pairs} is not a multiple of the micro-batch "
                      f"(global_batch_size / accum_steps = {micro}): held-out pairs are evaluated a micro-batch "
                      "at a time")
