"""The splash kernels' block size as a memory lever (issue 27): the same train step compiled by `mapo_jax.aot` for a
TPU slice with each largest block (`models/attention.py` SPLASH_MAX_BLOCK: every block of the kernel, forward and
backward, is the largest multiple of 128 up to it that divides the sequence), one after the other in one process.

  python bench/splash_blocks.py --config configs/sdxl_mapo.py --topology v5p-8 --blocks=128 --blocks=512 \\
      --blocks=1024 --config.global_batch_size=4 --config.accum_steps=1

Prints one JSON line per block: the block, whether the step fits, temporaries and peak per chip (GiB), compile
seconds, or the compiler's error (a block whose tiles do not fit the kernel's VMEM fails to compile).
"""
import functools
import json
import os

from absl import app, flags
from ml_collections import config_flags

from mapo_jax import aot
from mapo_jax import config as config_lib
from mapo_jax.models import attention

GIB = 2**30
BLOCKS = flags.DEFINE_multi_integer("blocks", [128, 256, 512, 1024], "largest splash blocks to compile with")


def main(cli, argv):
  del argv
  import jax
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  gib = lambda n: None if n is None else round(n / GIB, 3)
  for block in BLOCKS.value:
    attention.SPLASH_MAX_BLOCK = block
    r = aot.run(cli.config.value, cli.topology.value, cli.architecture.value, config_file=config_file,
                log=lambda *_: None)
    print(json.dumps({"splash_max_block": block, "fits": r.fits, "temp_gib": gib(r.temp_bytes),
                      "peak_gib": gib(r.peak_bytes), "hbm_gib": gib(r.hbm_bytes),
                      "compile_s": round(r.compile_seconds or 0, 1), "error": r.error}), flush=True)


if __name__ == "__main__":
  app.run(functools.partial(main, aot.define_flags()),
          flags_parser=functools.partial(config_lib.parse_command_line, dashed=aot.DASHED_FLAGS, doc=__doc__))
