"""Reward models (mapo_jax.rewards) against their reference implementations on tiny random models:
HPS v2 against open_clip with hpsv2's transform, the LAION aesthetic predictor against a torch copy of its
head on a transformers CLIPModel, sharded scoring against one device, and checkpoints of the wrong kind."""
import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_clip_reward_dir, perturb_
from mapo_jax import rewards
from mapo_jax.rewards import open_clip as oc
from mapo_jax.rewards.image_transforms import OPENAI_MEAN, OPENAI_STD


PROMPTS = ["a cat", "The RED dog!", "two  dogs &amp; a cat, 3 birds", "café au lait", "", "a dog on a red mat"]
TINY_OPEN_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 24, "head_width": 8,
                                                  "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}


def random_images(n, h, w, seed=0):
  """Smooth random images (noise upsampled), so the resize filters see image-like content."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
  return np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.BILINEAR)) for s in small])


# Sizes chosen so the centre crop's offset is fractional (torchvision rounds it) and one is upsampled.
SIZES = [(36, 47), (50, 33), (25, 20)]


def torchvision_transform(size, mean, std, *, tensor_first):
  """hpsv2's val transform (ToTensor, then Resize the tensor) or OpenAI CLIP's (Resize the PIL image first)."""
  from torchvision import transforms as T
  resize = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
  steps = [T.ToTensor(), *resize] if tensor_first else [*resize, T.ToTensor()]
  return T.Compose([*steps, T.Normalize(mean, std)])


# --- HPS v2 -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hps(tmp_path_factory):
  """A tiny open_clip CLIP saved as HPS releases it ({"state_dict": ...}, torch.save) with its config."""
  import open_clip  # torchvision beside CPU torch: see conftest
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
  torch.manual_seed(0)
  cfg = TINY_OPEN_CLIP
  model = perturb_(CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))).eval()
  folder = tmp_path_factory.mktemp("hps")
  torch.save({"state_dict": model.state_dict()}, folder / "HPS_tiny.pt")
  (folder / rewards.HPS_CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg}))
  return folder / "HPS_tiny.pt", model, open_clip


def hps_reference(model, open_clip, prompts, images):
  """hpsv2's `score`: the diagonal of normalised image features @ normalised text features."""
  transform = torchvision_transform(32, OPENAI_MEAN, OPENAI_STD, tensor_first=True)
  pixels = torch.stack([transform(Image.fromarray(i)) for i in images])
  with torch.no_grad():
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(open_clip.tokenize(prompts), normalize=True)
  return (image * text).sum(-1).numpy()


def test_open_clip_tokens_match(hps, tmp_path):
  _, _, open_clip = hps
  long = " ".join(["a very long prompt about a red cat"] * 15)  # > 77 tokens: truncation keeps an EOT
  prompts = [*PROMPTS, long, "Tabs\tand\nnewlines", "1234567 numbers, (brackets) [x] don't"]
  tokenizer = oc.load_tokenizer(hps[0].parent)  # no tokenizer files there: open_clip's own BPE file
  want = open_clip.tokenize(prompts).numpy()
  np.testing.assert_array_equal(oc.tokenize(tokenizer, prompts), want)
  # The same vocabulary as transformers files beside a checkpoint: tokenizer.json, or vocab.json + merges.txt.
  saved, files = tmp_path / "saved", tmp_path / "files"
  tokenizer.save_pretrained(saved)
  files.mkdir()
  (files / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
  merges = json.loads((saved / "tokenizer.json").read_text())["model"]["merges"]
  (files / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges) + "\n")
  for folder in (saved, files):
    np.testing.assert_array_equal(oc.tokenize(oc.load_tokenizer(folder), prompts), want)


def test_hps_matches_open_clip(hps):
  path, model, open_clip = hps
  scorer = rewards.load_reward("hps", path, batch_size=8)
  for k, (h, w) in enumerate(SIZES):
    images = random_images(len(PROMPTS), h, w, seed=k)
    ref = hps_reference(model, open_clip, PROMPTS, images)
    # Cosines (|s| <= 1) in float32 through two layers per tower (measured: <= 4e-7); the float resizes
    # (PIL's and torch's) agree to ~1e-6 per pixel on these smooth images.
    np.testing.assert_allclose(scorer(PROMPTS, images), ref, rtol=0, atol=1e-5)
    assert np.ptp(ref) > 0.1  # the scores differ, so matching them means something


def test_vit_h_14_parameters_match_open_clip(hps):
  """Full size, shapes only: ViT-H-14 (HPS's architecture) has open_clip's 686 tensors and 986M parameters."""
  from flax import nnx
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
  from mapo_jax.convert import torch_key
  open_clip = hps[2]
  cfg = open_clip.get_model_config("ViT-H-14")
  assert cfg == oc.VIT_H_14
  with torch.device("meta"):  # no memory
    ref = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]))
  want = {oc._rename(k): v.numel() for k, v in ref.state_dict().items()}
  model = nnx.eval_shape(lambda: oc.OpenCLIP(oc.VIT_H_14, rngs=nnx.Rngs(0)))
  ours = {torch_key(p): v.size for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert ours == want and len(ours) == 686 and sum(ours.values()) == 986_109_441


def test_hps_safetensors_copy(hps, tmp_path):
  from safetensors.numpy import save_file
  path, model, _ = hps
  save_file({k: v.numpy() for k, v in model.state_dict().items()}, tmp_path / "hps.safetensors")
  shutil.copy(path.parent / rewards.HPS_CONFIG_FILE, tmp_path)
  images = random_images(len(PROMPTS), 36, 47)
  ours = rewards.load_reward("hps", tmp_path / "hps.safetensors")(PROMPTS, images)
  np.testing.assert_array_equal(ours, rewards.load_reward("hps", path)(PROMPTS, images))


def test_sharded_scores_equal_single_device(hps):
  assert jax.device_count() == 8
  path = hps[0]
  images = random_images(11, 36, 47)  # 11 items: two batches of 8, the second padded
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(11)]
  sharded = rewards.load_reward("hps", path, batch_size=5)  # rounded up to 8, one item per device
  assert sharded.batch_size == 8 and sharded.mesh.size == 8
  one = rewards.load_reward("hps", path, batch_size=8, mesh=rewards.data_mesh(jax.devices()[:1]))
  # Each item is computed alone on its device in both cases; only XLA's choice of kernels can differ.
  np.testing.assert_allclose(sharded(prompts, images), one(prompts, images), rtol=0, atol=1e-6)


SCORE_IN_PROCESS = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, rank, checkpoint, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", 2, rank)
from mapo_jax import rewards
scorer = rewards.load_reward("hps", checkpoint, batch_size=4)
scores = scorer(json.load(open(f"{folder}/prompts.json")), np.load(f"{folder}/images.npy"))
np.save(f"{folder}/scores_{rank}.npy", scores)
"""


def test_two_processes_score_as_one(hps, trainer_env, tmp_path):
  """Multi-host on CPU: two processes x 2 devices each get every score, equal to one process's."""
  import subprocess
  import sys
  from test_multihost import free_port
  from conftest import REPO
  path = hps[0]
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]  # 6 items: batches of 4, the second padded
  images = random_images(6, 36, 47)
  (tmp_path / "prompts.json").write_text(json.dumps(prompts))
  np.save(tmp_path / "images.npy", images)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", SCORE_IN_PROCESS, str(port), str(rank), str(path), str(tmp_path)],
                            env=trainer_env(devices=2, fast_compile=True), cwd=REPO, stderr=subprocess.PIPE, text=True)
           for rank in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
  want = rewards.load_reward("hps", path)(prompts, images)
  for rank in range(2):
    np.testing.assert_allclose(np.load(tmp_path / f"scores_{rank}.npy"), want, rtol=0, atol=1e-6)


# --- LAION aesthetic predictor -------------------------------------------------------------------------

class AestheticMLP(torch.nn.Module):
  """improved-aesthetic-predictor's `MLP` (its `layers` Sequential; the Lightning training parts left out)."""

  def __init__(self, input_size):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  def forward(self, x):
    return self.layers(x)


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
  """A tiny CLIPModel folder (quick_gelu vision tower, as ViT-L/14's) holding the head file."""
  folder = tmp_path_factory.mktemp("aesthetic")
  clip = make_clip_reward_dir(folder, vision_act="quick_gelu")
  torch.manual_seed(1)
  head = perturb_(AestheticMLP(clip.config.projection_dim), seed=1, scale=0.3).eval()
  torch.save(head.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
  return folder, clip, head


def aesthetic_reference(clip, head, images, folder):
  """The predictor's script: OpenAI CLIP preprocess, encode_image, NumPy L2 normalisation, the MLP."""
  processor = json.loads((folder / "preprocessor_config.json").read_text())
  transform = torchvision_transform(32, processor["image_mean"], processor["image_std"], tensor_first=False)
  pixels = torch.stack([transform(Image.fromarray(i)) for i in images])
  with torch.no_grad():
    e = clip.get_image_features(pixel_values=pixels).pooler_output.numpy()
    e = e / np.linalg.norm(e, 2, axis=-1, keepdims=True)
    return head(torch.from_numpy(e)).numpy()[:, 0]


def test_aesthetic_matches_torch(aesthetic):
  folder, clip, head = aesthetic
  by_file = rewards.load_reward("aesthetic", folder / "sac+logos+ava1-l14-linearMSE.pth")
  by_folder = rewards.load_reward("aesthetic", folder)
  for k, (h, w) in enumerate(SIZES):
    images = random_images(len(PROMPTS), h, w, seed=k)
    ref = aesthetic_reference(clip, head, images, folder)
    ours = by_file(PROMPTS, images)
    # Scores span ~7 units: the unit embedding's float32 error (~1e-6) times the head's gain (~10), plus
    # the head's own float32 sums (measured: <= 2e-5).
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(by_folder(PROMPTS, images), ours)
    assert np.ptp(ref) > 0.01


# --- ImageReward ---------------------------------------------------------------------------------------------

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "dog", "red", "the",
              "on", "##s", "!", ",", ".", "&"]
# transformers' BLIP port → ImageReward's key names (BLIP's vit.py / med.py, under ImageReward's `blip.`).
BLIP_VISION_KEYS = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
                    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^encoder\.layers\.", "blocks."),
                    (r"\.layer_norm(\d)\.", r".norm\1."), (r"\.self_attn\.projection\.", ".attn.proj."),
                    (r"\.self_attn\.qkv\.", ".attn.qkv."), (r"^post_layernorm\.", "norm.")]


def image_reward_state_dict(vision, text, head):
  """transformers' BlipVisionModel / BlipTextModel and the head, keyed as ImageReward's state dict."""
  out = {}
  for key, value in vision.state_dict().items():
    for pattern, repl in BLIP_VISION_KEYS:
      key = re.sub(pattern, repl, key)
    out[f"blip.visual_encoder.{key}"] = value
  out.update((f"blip.text_encoder.{k}", v) for k, v in text.state_dict().items())
  out.update((f"mlp.{k}", v) for k, v in head.state_dict().items())
  return out


@pytest.fixture(scope="module")
def image_reward(tmp_path_factory):
  """A tiny ImageReward folder: ImageReward.pt (ImageReward's keys), med_config.json, a BERT vocab.txt. The
  reference towers are transformers' BLIP classes, ports of BLIP's vit.py and med.py; the same loader
  matched ImageReward 1.5's own modules (docs/rewards.md)."""
  from transformers import BlipTextConfig, BlipVisionConfig
  from transformers.models.blip.modeling_blip import BlipVisionModel
  from transformers.models.blip.modeling_blip_text import BlipTextModel
  folder = tmp_path_factory.mktemp("image_reward")
  (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
  med = dict(architectures=["BertModel"], hidden_act="gelu", hidden_size=32, intermediate_size=64, layer_norm_eps=1e-12,
             max_position_embeddings=40, model_type="bert", num_attention_heads=2, num_hidden_layers=2, pad_token_id=0,
             vocab_size=len(BERT_WORDS) + 2, encoder_width=128, add_cross_attention=True)
  (folder / "med_config.json").write_text(json.dumps(med))
  torch.manual_seed(0)
  vision = perturb_(BlipVisionModel(BlipVisionConfig(
      hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
      layer_norm_eps=1e-6, hidden_act="gelu"))).eval()
  text = perturb_(BlipTextModel(BlipTextConfig(
      vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=128, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12, bos_token_id=None, sep_token_id=3,
      is_decoder=True),  # builds the cross-attention; the forward runs as an encoder (is_decoder=False)
      add_pooling_layer=False), seed=1).eval()
  head = perturb_(AestheticMLP(32), seed=2, scale=0.1).eval()  # ImageReward's MLP has the predictor's layout
  torch.save(image_reward_state_dict(vision, text, head), folder / "ImageReward.pt")
  return folder, vision, text, head


def image_reward_reference(folder, vision, text, head, prompts, images):
  """ImageReward.score_gard: the [CLS] state of the text encoder cross-attending to all image tokens, through
  the MLP, standardised with ImageReward's mean and std; OpenAI CLIP's preprocess; 35 BERT tokens."""
  from transformers import BertTokenizer
  from mapo_jax.rewards.image_reward import SCORE_MEAN, SCORE_STD
  transform = torchvision_transform(32, OPENAI_MEAN, OPENAI_STD, tensor_first=False)
  pixels = torch.stack([transform(Image.fromarray(i)) for i in images])
  tokens = BertTokenizer(str(folder / "vocab.txt"))(prompts, padding="max_length", truncation=True, max_length=35,
                                                     return_tensors="pt")
  with torch.no_grad():
    image = vision(pixel_values=pixels).last_hidden_state
    h = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image,
             encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long), is_decoder=False).last_hidden_state
    return ((head(h[:, 0]) - SCORE_MEAN) / SCORE_STD).numpy()[:, 0]


def test_image_reward_matches_blip(image_reward):
  folder = image_reward[0]
  prompts = [*PROMPTS[:4], "dogs. dogs. dogs. " * 10, ""]  # one prompt longer than 35 tokens
  by_folder = rewards.load_reward("imagereward", folder)
  by_file = rewards.load_reward("imagereward", folder / "ImageReward.pt")
  for k, (h, w) in enumerate(SIZES):
    images = random_images(len(prompts), h, w, seed=k)
    ref = image_reward_reference(*image_reward, prompts, images)
    ours = by_folder(prompts, images)
    # Scores of size ~0.3: float32 through two ViT blocks and two BERT layers, then the head (measured: <= 3e-6).
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(by_file(prompts, images), ours)
    assert np.ptp(ref) > 0.1


# --- PickScore and CLIP score through load_reward -------------------------------------------------------

def test_pickscore_and_clip_score_match_transformers(tmp_path):
  from test_evaluate import reference_scores
  model = make_clip_reward_dir(tmp_path)
  images = random_images(len(PROMPTS), 36, 47)
  ref = reference_scores((tmp_path, model), PROMPTS, images)
  # logit_scale.exp() = e³ ≈ 20 times a float32 cosine; the CLIP score is 100 · cosine.
  np.testing.assert_allclose(rewards.load_reward("pickscore", tmp_path)(PROMPTS, images), ref["score"],
                             rtol=0, atol=1e-4)
  np.testing.assert_allclose(rewards.load_reward("clip", tmp_path)(PROMPTS, images),
                             100 * np.maximum(ref["cosine"], 0), rtol=0, atol=1e-4)
  assert np.ptp(ref["score"]) > 1


# --- Checkpoints of the wrong kind ---------------------------------------------------------------------

def test_wrong_kind_of_checkpoint_is_named(hps, aesthetic, image_reward, tmp_path):
  hps_file, (clip_folder, _, _) = hps[0], aesthetic
  head_file = clip_folder / "sac+logos+ava1-l14-linearMSE.pth"
  with pytest.raises(ValueError, match=re.escape(f"hps: {clip_folder} is not a file")):
    rewards.load_reward("hps", clip_folder)  # a CLIP / PickScore folder
  with pytest.raises(ValueError, match=re.escape(f"{hps_file} is not a LAION aesthetic-predictor head")):
    rewards.load_reward("aesthetic", hps_file)
  with pytest.raises(ValueError, match=re.escape(f"{head_file} is not an open_clip CLIP state dict")):
    rewards.load_reward("hps", head_file)
  with pytest.raises(ValueError, match=re.escape(f"pickscore: {hps_file} is not a folder")):
    rewards.load_reward("pickscore", hps_file)
  # An HPS file without its tiny config is read as ViT-H-14: every mis-shaped key is listed, with the file.
  shutil.copy(hps_file, tmp_path / "hps.pt")
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'hps.pt'} does not match")) as error:
    rewards.load_reward("hps", tmp_path / "hps.pt")
  assert "visual.conv1.weight: checkpoint (24, 192), model (1280, 588)" in str(error.value)
  ir_file = image_reward[0] / "ImageReward.pt"
  with pytest.raises(ValueError, match=re.escape(f"{hps_file} is not an ImageReward checkpoint")):
    rewards.load_reward("imagereward", hps_file)
  with pytest.raises(ValueError, match=re.escape(f"{ir_file} is not an open_clip CLIP state dict")):
    rewards.load_reward("hps", ir_file)
  (tmp_path / "old.pt").write_bytes(b"\x80\x02not a zip")
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'old.pt'} is not a PyTorch zip checkpoint")):
    rewards.load_reward("hps", tmp_path / "old.pt")
