"""Export trained UNet parameters as a diffusers pipeline folder, or a LoRA run's adapters as a LoRA file.

    python -m mapo_jax.export --checkpoint WORKDIR [--step N] --base BASE_PIPELINE --out OUT \
        [--dtype fp32|fp16|bf16] [--unet-only] [--format diffusers|kohya] [--fuse] [--ema]

Reads only the parameters of checkpoint N (default: the latest) from WORKDIR/checkpoints (with --ema
their exponential moving average instead, for runs with config.ema_decay >= 0) and writes
OUT/unet/ with them plus a copy of every other component of BASE_PIPELINE (VAE, text towers,
tokenizers, scheduler, model_index.json), so `StableDiffusionXLPipeline.from_pretrained(OUT)` (or
`StableDiffusionPipeline` for SD 1.x) loads it. With --unet-only, OUT is a bare UNet folder
(`UNet2DConditionModel.from_pretrained(OUT)`). The folder is written under a temporary name and
renamed at the end, replacing an older OUT. The trainer writes WORKDIR/export/ the same way.

A LoRA run (config.lora.rank > 0, read from WORKDIR's recorded config) exports its adapters:
OUT/pytorch_lora_weights.safetensors in the diffusers format (`pipe.load_lora_weights(OUT)`), or with
`--format kohya` OUT/lora_kohya.safetensors (`lora_unet_*` keys with alphas, for ComfyUI/A1111-style tools);
`--fuse` instead writes the full pipeline with the adapters merged into the UNet (W + alpha/r · A B).
See docs/lora.md.

Every mode writes OUT/README.md, a model card (mapo_jax/run/card.py, docs/model_cards.md): Hub metadata
(base_model, license from the base's card, tags) and how the run made the model, from the workdir's files.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
from absl import app, logging
from flax import nnx

from mapo_jax import cli, pipelines
from mapo_jax.training import lora
from mapo_jax.run import card as card_lib
from mapo_jax.run.checkpoint import CHECKPOINTS, EMA, Checkpointer, abstract_like
from mapo_jax.convert.files import EXPORT_DTYPES
from mapo_jax.run.workdir import previous_config, recorded_value, remove_stale_temporaries


Card = Callable[[Path], Any]  # writes a model card into the (temporary) export folder it is given


def _add_card(card: Card | None, folder: Path) -> None:
  """The card is written into the folder before it is renamed into place; a failure to write it leaves the
  weights exported, with a warning (the weights are what a finished run must not lose)."""
  if card is None:
    return
  try:
    card(folder)
  except Exception:  # noqa: BLE001 (any failure of the card: logged with its traceback)
    logging.exception("writing the model card into %s failed; the weights are exported without it", folder)


def run_card(workdir: str | os.PathLike, base: str | os.PathLike, step: int, out: str | os.PathLike, **kwargs) -> Card:
  """The card of the export of checkpoint `step` of the run in `workdir` to `out` (`card.write_card`)."""
  return functools.partial(card_lib.write_card, workdir=workdir, base=base, step=step, location=out, **kwargs)


def export_denoiser(model: nnx.Module, base: str | os.PathLike, out: str | os.PathLike, *,
                    dtype: str = "fp32", denoiser_only: bool = False, card: Card | None = None) -> Path:
  """Writes `model` (weights cast to `dtype`) with the base pipeline's other components to `out`; with
  `denoiser_only`, a bare model folder (for SD: a UNet folder). `card(folder)` adds a model card (`run_card`)."""
  if lora.adapted(model):  # the denoiser's weights alone would silently drop them
    raise ValueError("the model has LoRA adapters: merge them first (lora.fuse) or write them with export_lora")
  base, out = Path(base), Path(out)
  family = pipelines.family(base)
  remove_stale_temporaries(out.parent)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  if denoiser_only:
    family.save_denoiser(model, tmp, dtype=dtype)
  else:
    tmp.mkdir(parents=True)
    for entry in base.iterdir():
      if entry.name == family.DENOISER:
        continue
      (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    family.save_denoiser(model, tmp / family.DENOISER, dtype=dtype)
  _add_card(card, tmp)  # replaces the base's own README.md, copied above
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def export_lora(model: nnx.Module, out: str | os.PathLike, fmt: str = "diffusers", *, card: Card | None = None) -> Path:
  """Writes `model`'s adapters (its base may be abstract) as OUT/<lora file> (`lora.save`), OUT written under a
  temporary name and renamed, replacing an older OUT. `card(folder)` adds a model card (`run_card`)."""
  out = Path(out)
  remove_stale_temporaries(out.parent)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  name = lora.save(model, tmp, fmt).name
  _add_card(card, tmp)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out / name


def run_lora_config(workdir: str | os.PathLike) -> dict:
  """The LoRA settings of the run in `workdir` (its recorded config; rank 0 = a full fine-tune)."""
  recorded = previous_config(Path(workdir))
  return dict((recorded[1].get("lora") if recorded else None) or {"rank": 0})


def load_checkpoint_denoiser(workdir: str | os.PathLike, base: str | os.PathLike, step: int | None = None, *,
                             base_weights: bool = True, ema: bool = False):
  """The base pipeline's denoiser architecture with the parameters of checkpoint `step` (default: latest);
  with `ema`, the parameters' moving average (config.ema_decay >= 0).

  A LoRA run's checkpoint holds only adapters: they are attached to the base denoiser, whose weights are
  read from `base` (or, with `base_weights=False`, left abstract: enough to write the adapters)."""
  family = pipelines.family(base)
  scan = bool(recorded_value(Path(workdir), "scan_blocks"))  # the checkpoint's layout: stacked blocks or not
  model = family.abstract_denoiser(base, scan=scan)
  settings = run_lora_config(workdir)
  trainable = nnx.Param
  if settings["rank"]:
    lora.add_adapters(model, rank=settings["rank"], alpha=settings["alpha"], targets=tuple(settings["targets"]),
                      seed=0)
    trainable = lora.LoRAParam
  graphdef, abstract, rest = nnx.split(model, trainable, ...)
  if not (Path(workdir) / CHECKPOINTS).is_dir():
    raise FileNotFoundError(f"{workdir} holds no {CHECKPOINTS}/ folder (is it a training workdir?)")
  checkpointer = Checkpointer(Path(workdir) / CHECKPOINTS)
  step = checkpointer.latest_step() if step is None else step
  if step is None or step not in checkpointer.all_steps():
    raise FileNotFoundError(f"{workdir}/{CHECKPOINTS}: no checkpoint {step if step is not None else ''}"
                            f" (have {checkpointer.all_steps()})")
  pure = nnx.to_pure_dict(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = checkpointer.restore_params(step, abstract_like(pure, jax.tree.map(lambda _: device, pure)),
                                       item=EMA if ema else "params")
  checkpointer.close()
  nnx.replace_by_pure_dict(abstract, params)
  model = nnx.merge(graphdef, abstract, rest)
  if settings["rank"] and base_weights:
    real = family.load_denoiser(base, scan=scan)
    layers = lora.linear_layers(real)
    for name, adapter in lora.adapted(model).items():
      lora.attach(layers[name], adapter.a.get_value(), adapter.b.get_value(), adapter.scale)
    model = real
  return model, step


def parse_flags(argv: list[str]) -> argparse.Namespace:
  # argparse (dashed names are the documented interface) rather than absl's global flags.
  p = cli.parser(__doc__)
  p.add_argument("--checkpoint", required=True, help="the training workdir (holding checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--base", required=True, help="the base diffusers pipeline folder the run started from")
  p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
  p.add_argument("--dtype", default="fp32", choices=EXPORT_DTYPES, help="UNet weight dtype")
  p.add_argument("--unet-only", action="store_true", help="write a bare UNet folder, no other components")
  p.add_argument("--format", choices=lora.FORMATS, default=None,
                 help="LoRA runs: the LoRA file's format (default diffusers: pytorch_lora_weights.safetensors)")
  p.add_argument("--fuse", action="store_true", help="LoRA runs: write the full pipeline with the adapters merged")
  p.add_argument("--ema", action="store_true", help="export the parameters' moving average (config.ema_decay)")
  return cli.parse(p, argv)


def main(args: argparse.Namespace) -> None:
  is_lora = bool(run_lora_config(args.checkpoint)["rank"])
  if not is_lora and (args.format or args.fuse):
    raise app.UsageError(f"--format/--fuse: the run in {args.checkpoint} is a full fine-tune (no LoRA adapters)")
  if args.fuse and args.format:
    raise app.UsageError("--fuse writes a pipeline folder; --format is for LoRA files: give one of them")
  model, step = load_checkpoint_denoiser(args.checkpoint, args.base, args.step,
                                         base_weights=not is_lora or args.fuse, ema=args.ema)
  if is_lora and not args.fuse:
    out = export_lora(model, args.out, args.format or "diffusers",
                      card=run_card(args.checkpoint, args.base, step, args.out, ema=args.ema))
  else:
    model = lora.fuse(model) if is_lora else model
    out = export_denoiser(model, args.base, args.out, dtype=args.dtype, denoiser_only=args.unet_only,
                          card=run_card(args.checkpoint, args.base, step, args.out, dtype=args.dtype,
                                        fused=args.fuse, ema=args.ema))
  logging.info("exported step %d of %s to %s", step, args.checkpoint, out)
  print(f"exported step {step} to {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
