"""mapo_jax: preference alignment of text-to-image diffusion models in JAX + Flax NNX."""
import glob as _glob
import importlib.util as _importlib_util
import os as _os

__version__ = "0.1.0"

# Quiet start-up on a CPU host, before anything imports jax or transformers:
# - libtpu (installed for ahead-of-time TPU compiles, `mapo_jax.aot`) probes for a TPU and prints a page of
#   warnings when there is none. With no TPU device and no NVIDIA GPU here, only the CPU backend can start.
# - transformers warns that PyTorch is missing; we use it for tokenizers only.
if ("JAX_PLATFORMS" not in _os.environ and _importlib_util.find_spec("libtpu") is not None
    and not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*") and not _glob.glob("/dev/nvidia[0-9]*")):
  _os.environ["JAX_PLATFORMS"] = "cpu"
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
