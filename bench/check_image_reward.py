"""Cross-check of mapo_jax's ImageReward against ImageReward's own code (the `image-reward` 1.5 wheel), on a
tiny random model: the wheel's BLIP `vit.VisionTransformer`, `med.BertModel` and `ImageReward.MLP`, scored by
its `ImageReward.score_gard`, saved with `torch.save` as ImageReward.pt is, then loaded by
`rewards.load_reward("imagereward", ...)`.

    pip download image-reward==1.5 --no-deps -d /tmp/ir && unzip -q -o /tmp/ir/*.whl -d /tmp/ir
    python bench/check_image_reward.py /tmp/ir

The wheel pins timm 0.6.13, fairscale and transformers 4.x; to run it beside transformers 5 without those,
this script (not the library) supplies what the forward pass touches: fairscale's checkpoint_wrapper (used
only for gradient checkpointing), and transformers 4's `apply_chunking_to_forward`, `prune_linear_layer`,
`invert_attention_mask` and `get_head_mask` (their 4.x definitions). Its own package __init__ files, which
import training code, are skipped. Prints the largest score difference per image size.
"""
import json
import os
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from torchvision_compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers.modeling_utils as modeling_utils  # noqa: E402
import transformers.pytorch_utils as pytorch_utils  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BertConfig, BertTokenizer  # noqa: E402


def import_wheel(root: Path):
  for name, path in (("ImageReward", root / "ImageReward"), ("ImageReward.models", root / "ImageReward/models")):
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
  for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"):
    sys.modules[name] = types.ModuleType(name)
  sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = None
  modeling_utils.apply_chunking_to_forward = pytorch_utils.apply_chunking_to_forward
  modeling_utils.prune_linear_layer = pytorch_utils.prune_linear_layer
  modeling_utils.find_pruneable_heads_and_indices = None
  from ImageReward.models.BLIP import med, vit
  import ImageReward.ImageReward as image_reward
  med.BertModel.invert_attention_mask = (
      lambda self, m: (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min)
  med.BertModel.get_head_mask = lambda self, head_mask, n: [None] * n
  med.BertModel.init_weights = lambda self: None  # weights are set below
  return vit, med, image_reward


def main(root: str):
  vit, med, image_reward = import_wheel(Path(root))
  from mapo_jax import rewards
  torch.manual_seed(0)
  folder = Path(tempfile.mkdtemp())
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "dog", "red", "the",
           "on", "##s", "!", ",", ".", "&"]
  (folder / "vocab.txt").write_text("\n".join(words) + "\n")
  (folder / "med_config.json").write_text(json.dumps(dict(
      architectures=["BertModel"], hidden_act="gelu", hidden_size=32, intermediate_size=64, layer_norm_eps=1e-12,
      max_position_embeddings=40, model_type="bert", num_attention_heads=2, num_hidden_layers=2, pad_token_id=0,
      vocab_size=len(words) + 2, encoder_width=128, add_cross_attention=True)))

  class Blip(torch.nn.Module):  # BLIP_Pretrain's modules, at a tiny size (it hard-codes ViT-L and a Hub tokenizer)
    def __init__(self):
      super().__init__()
      self.visual_encoder = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
      self.text_encoder = med.BertModel(config=BertConfig.from_json_file(str(folder / "med_config.json")),
                                        add_pooling_layer=False)
      self.vision_proj, self.text_proj = torch.nn.Linear(128, 16), torch.nn.Linear(32, 16)

  class TinyImageReward(torch.nn.Module):  # ImageReward's attributes; its score_gard does the scoring
    score_gard = image_reward.ImageReward.score_gard

    def __init__(self):
      super().__init__()
      self.device, self.blip, self.mlp = "cpu", Blip(), image_reward.MLP(32)
      self.mean, self.std = 0.16717362830052426, 1.0333394966054072

  model = TinyImageReward().eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=gen) * (0.1 if name.startswith("mlp") else 0.05))
  torch.save(model.state_dict(), folder / "ImageReward.pt")
  scorer = rewards.load_reward("imagereward", folder)
  prompts = ["a cat", "the red dog!", "a dog on the red cat, the cats & dogs", "red", "dogs. dogs. dogs. " * 10, ""]
  tokenizer = BertTokenizer(str(folder / "vocab.txt"))
  rng = np.random.default_rng(0)
  for h, w in [(36, 47), (50, 33), (25, 20)]:
    images = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
                                  .resize((w, h), Image.BILINEAR)) for _ in prompts])
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = torch.stack([image_reward._transform(32)(Image.fromarray(i)) for i in images])
    with torch.no_grad():
      ref = model.score_gard(tokens.input_ids, tokens.attention_mask, pixels)[:, 0].numpy()
    ours = scorer(prompts, images)
    print(f"{h}x{w}: max |ours - ImageReward| = {np.abs(ours - ref).max():.2e} (scores span {np.ptp(ref):.3f})")


if __name__ == "__main__":
  main(sys.argv[1])
