"""The trainer's guards against silently wrong runs: a cache encoded by another VAE than the one the run
decodes with, too many skipped updates (config.max_skipped_fraction), and parameters that are not finite or
grew far past the starting model's (config.max_param_norm_ratio), which are never exported."""
from __future__ import annotations

import os

import jax
import numpy as np
import optax

from mapo_jax import config as config_lib
from mapo_jax.data.cache import encoded_vae

SKIP_WINDOW = 100  # steps over which config.max_skipped_fraction is measured

# One compiled program: op-by-op reductions over parameters sharded across processes would each need
# their own collective.
global_norm = jax.jit(optax.tree.norm)


def check_cache_vae(manifest: dict, cache_dir: str, vae: str) -> None:
  """ConfigError naming config.vae unless the cache was encoded by `vae` ("" = the pipeline's own vae/):
  latents of another VAE live in another space, and training on them would silently be wrong."""
  encoded = encoded_vae(manifest)
  same = os.path.abspath(encoded) == os.path.abspath(vae) if encoded and vae else encoded == vae
  if not same:
    describe = lambda v: repr(v) if v else "the pipeline's own vae/"
    raise config_lib.ConfigError("vae", f"{describe(vae)}, but {cache_dir} was encoded with {describe(encoded)}: "
                                 "set config.vae to the VAE that encoded the cache (`encode --vae`), or re-encode")


def check_cache_text_tokens(manifest: dict, cache_dir: str, max_sequence_length: int) -> None:
  """ConfigError naming config.max_sequence_length unless the cache's prompts were encoded at it (`encode
  --max_sequence_length`; 0 = the family's default): prompts at another T5 length are another conditioning, and
  sample grids would not see what the model trained on."""
  encoded = manifest["settings"].get("max_sequence_length", 0)
  if encoded != max_sequence_length:
    describe = lambda n: f"{n} T5 tokens" if n else "the family's default T5 length (0)"
    raise config_lib.ConfigError("max_sequence_length", f"{describe(max_sequence_length)}, but {cache_dir} was "
                                 f"encoded at {describe(encoded)}: set config.max_sequence_length to "
                                 f"{encoded}, or re-encode with `encode --max_sequence_length {max_sequence_length}`")


class DivergedError(RuntimeError):
  """Training diverged: too many skipped updates, or parameters unfit to export."""


def check_skipped(history: list[tuple[int, int]], step: int, skipped: int, max_fraction: float) -> None:
  """DivergedError when more than max_fraction × SKIP_WINDOW of the last SKIP_WINDOW steps skipped their
  update. `history` holds (step, cumulative skipped) of earlier checks, oldest first; this one is added, and
  checks older than the window's base are dropped."""
  history.append((step, skipped))
  base = next((i for i in range(len(history) - 1, -1, -1) if history[i][0] <= step - SKIP_WINDOW), 0)
  del history[:base]  # older checks are never a base again (steps only grow): a week-long run keeps a window
  base_step, base_skipped = history[0]
  recent = skipped - base_skipped
  if recent > max_fraction * SKIP_WINDOW:
    raise DivergedError(f"{recent} of the last {step - base_step} steps skipped their update for a non-finite "
                        f"loss or gradient (config.max_skipped_fraction={max_fraction} of {SKIP_WINDOW} steps): "
                        "the run diverged; lower config.optim.lr or check the data. Nothing was exported.")


def check_exportable(params, initial_norm: float, max_ratio: float) -> None:
  """DivergedError unless every parameter is finite and the global norm is within max_ratio × the initial."""
  norm = float(global_norm(params))
  if not np.isfinite(norm):
    raise DivergedError("the trained parameters are not finite; nothing was exported")
  if norm > max_ratio * initial_norm:
    raise DivergedError(f"the parameters' global norm grew from {initial_norm:.4g} to {norm:.4g}, more than "
                        f"config.max_param_norm_ratio={max_ratio} times: the run diverged; nothing was exported")
