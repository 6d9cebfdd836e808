"""`import open_clip` on a CPU-only torch: a test helper.

The PyPI torchvision wheel is built against CUDA torch; with the CPU torch its compiled ops fail to
register, and `import torchvision` dies when its Python code declares fake kernels for `torchvision::nms`.
open_clip needs only torchvision's Python transforms, so declaring the two missing op schemas first lets
the import succeed. Done only when a plain `import torchvision` fails.
"""
import importlib

_LIBRARY = None  # the torch.library.Library that owns the schemas: it must stay alive


def import_open_clip():
  global _LIBRARY
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    import sys

    import torch
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]  # the half-imported package
    if _LIBRARY is None:
      _LIBRARY = torch.library.Library("torchvision", "DEF")
      _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  return importlib.import_module("open_clip")
