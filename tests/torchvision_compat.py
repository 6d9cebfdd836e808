"""`import torchvision` (and so open_clip, and transformers' CLIP models) on a CPU-only torch: a test helper.

The PyPI torchvision wheel is built against CUDA torch; with the CPU torch its compiled ops fail to
register, and `import torchvision` dies when its Python code declares fake kernels for `torchvision::nms`.
open_clip and transformers need only torchvision's Python transforms, so declaring the two missing op
schemas first lets the import succeed. Done only when a plain `import torchvision` fails.
"""
import sys

_LIBRARY = None  # the torch.library.Library that owns the schemas: it must stay alive


def ensure_torchvision():
  global _LIBRARY
  try:
    import torchvision  # noqa: F401
    return
  except RuntimeError:
    pass
  import torch
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]  # the half-imported package
  _LIBRARY = torch.library.Library("torchvision", "DEF")
  _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import torchvision  # noqa: F401


def import_open_clip():
  ensure_torchvision()
  import open_clip
  return open_clip
