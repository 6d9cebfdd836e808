"""The Flax T5 encoder against transformers' T5EncoderModel on tiny random checkpoints: the ids the FLUX / SD3
pipelines make, the position buckets, config variants, bfloat16, the checkpoint layouts and a sharded load."""
from __future__ import annotations

import copy
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import jit_call, rel_l2
from flow_fixtures import TINY_T5, make_t5_encoder, make_t5_tokenizer
from mapo_jax import convert, sharding
from mapo_jax.convert.params import torch_key
from mapo_jax.models.t5 import (T5Config, T5EncoderModel, load_t5_encoder, relative_position_buckets,
                                save_t5_encoder, tokenize)

LENGTH = 16  # one shape for every forward pass here, so each architecture compiles once
# A short prompt (padding), an empty one (only </s>), one with an unknown character, one truncated.
PROMPTS = ["a red cat", "", "A photo of the blue sky",
           "the red dog sat on the blue sky, a photo of a cat on a dog on the red sky"]
F32_TOL = 1e-4  # the project's float32 bar for a forward pass


def reference(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids)).long()).last_hidden_state.float().numpy()


def random_ids(vocab_size, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, (len(PROMPTS), LENGTH)).astype(np.int32)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  path = tmp_path_factory.mktemp("t5")
  tokenizer = make_t5_tokenizer(path / "tokenizer")
  assert len(tokenizer) == TINY_T5["vocab_size"]
  ref = make_t5_encoder(path / "encoder")
  ids = tokenize(tokenizer, PROMPTS, LENGTH)
  return types.SimpleNamespace(path=path / "encoder", ref=ref, tokenizer=tokenizer, ids=ids,
                               model=load_t5_encoder(path / "encoder"))


@pytest.mark.parametrize("pipeline, encoder, tokenizer", [
    ("FluxPipeline", "text_encoder_2", "tokenizer_2"),
    ("StableDiffusion3Pipeline", "text_encoder_3", "tokenizer_3")])
def test_ids_and_embeddings_match_the_pipelines(t5, pipeline, encoder, tokenizer):
  """`tokenize` gives exactly the ids diffusers' `_get_t5_prompt_embeds` feeds the encoder (captured from the
  torch model's call), and our encoder on them gives the pipeline's prompt embeddings."""
  import diffusers
  seen = []
  hook = t5.ref.register_forward_pre_hook(lambda module, args: seen.append(args[0].numpy().copy()))
  try:
    stub = types.SimpleNamespace(**{encoder: t5.ref, tokenizer: t5.tokenizer}, tokenizer_max_length=77,
                                 _execution_device=torch.device("cpu"))
    with torch.no_grad():
      embeds = getattr(diffusers, pipeline)._get_t5_prompt_embeds(
          stub, PROMPTS, max_sequence_length=LENGTH, device=torch.device("cpu"), dtype=torch.float32)
  finally:
    hook.remove()
  np.testing.assert_array_equal(t5.ids, seen[-1])
  assert t5.ids.dtype == np.int32 and t5.ids.shape == (len(PROMPTS), LENGTH)
  # The cases the prompts were chosen for: padding, the empty prompt, <unk>, truncation ending in </s>.
  assert t5.ids[0, 3:].tolist() == [1] + [0] * (LENGTH - 4) and t5.ids[1, :2].tolist() == [1, 0]
  assert 2 in t5.ids[2] and t5.ids[3, -1] == 1 and 0 not in t5.ids[3]
  out = jit_call(t5.model, t5.ids)["last_hidden_state"]
  assert out.dtype == jnp.float32 and out.shape == (len(PROMPTS), LENGTH, TINY_T5["d_model"])
  assert rel_l2(out, embeds.numpy()) <= F32_TOL


def test_matches_transformers_on_every_token(t5):
  ids = random_ids(TINY_T5["vocab_size"])
  expected = reference(t5.ref, ids)
  assert rel_l2(jit_call(t5.model, ids)["last_hidden_state"], expected) <= F32_TOL
  # Rematerialised blocks (jax.checkpoint of each block) compute the same forward pass.
  remat = load_t5_encoder(t5.path, remat="full")
  assert rel_l2(jit_call(remat, ids)["last_hidden_state"], expected) <= F32_TOL


@pytest.mark.parametrize("num_buckets, max_distance, length", [(32, 128, 512), (16, 10, LENGTH), (8, 5, 40)])
def test_position_buckets_match_transformers(num_buckets, max_distance, length):
  """Bucket for bucket, including the float32 truncation at the log-bucket edges and the last bucket
  beyond max_distance."""
  from transformers.models.t5.modeling_t5 import T5Attention
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  expected = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
  ours = relative_position_buckets(length, length, num_buckets, max_distance)
  np.testing.assert_array_equal(ours, expected)
  if length > max_distance:  # distances past max_distance occur: both directions' last buckets are used
    assert {num_buckets // 2 - 1, num_buckets - 1} <= set(ours.ravel().tolist())


def test_position_buckets_fail_where_transformers_fails():
  """max_distance 8 = the exact buckets of 32: the log formula divides by log(1) = 0 for distances >= 8."""
  from transformers.models.t5.modeling_t5 import T5Attention
  relative = torch.arange(LENGTH)[None, :] - torch.arange(LENGTH)[:, None]
  buckets = T5Attention._relative_position_bucket(relative, True, 32, 8)
  assert buckets.min() < 0 or buckets.max() >= 32  # transformers' nn.Embedding lookup then raises
  with pytest.raises(ValueError, match="relative_attention_max_distance=8"):
    relative_position_buckets(LENGTH, LENGTH, 32, 8)
  relative_position_buckets(8, 8, 32, 8)  # distances below 8 only: fine, as in transformers


VARIANTS = {
    # Distances up to 15 with max_distance 10: the clamped last buckets in both directions.
    "beyond_max_distance": dict(relative_attention_num_buckets=16, relative_attention_max_distance=10),
    # Original T5: wi / wo with ReLU; inner width num_heads · d_kv = 48 != d_model; 3 blocks.
    "relu_t5": dict(feed_forward_proj="relu", d_kv=12, num_layers=3),
    # A stored dense_act_fn wins over the one feed_forward_proj implies (erf GELU, not gelu_new).
    "stored_dense_act_fn": dict(dense_act_fn="gelu"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path):
  ref = make_t5_encoder(tmp_path, {**TINY_T5, **VARIANTS[variant]}, seed=1)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["dense_act_fn"] == ref.config.dense_act_fn  # what the file says is what transformers runs
  model = load_t5_encoder(tmp_path)
  if variant == "relu_t5":
    assert not model.cfg.is_gated_act and model.cfg.dense_act_fn == "relu"
  if variant == "stored_dense_act_fn":  # numerically gelu_new would be off by only ~1.6e-4 here
    assert model.cfg.is_gated_act and model.cfg.dense_act_fn == "gelu"
  ids = random_ids(TINY_T5["vocab_size"], seed=2)
  assert rel_l2(jit_call(model, ids)["last_hidden_state"], reference(ref, ids)) <= F32_TOL


def bf16_tolerance(num_layers: int) -> float:
  """bfloat16 keeps 8 significant bits: each rounding errs by at most u = 2^-8 relative. Along a sublayer
  about six roundings reach its output (normed input, weights, projections, softmax probabilities or the
  gate, the output); independent errors add in quadrature over the 2·num_layers sublayers and the final
  norm's output: sqrt(12·num_layers + 1)·u, doubled for amplification through the norms and softmax."""
  return 2 * 2.0**-8 * math.sqrt(12 * num_layers + 1)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_close_to_float32(t5, param_dtype):
  model = load_t5_encoder(t5.path, jnp.bfloat16, param_dtype=param_dtype)
  assert model.encoder.block[0].layer[1].DenseReluDense.wo.kernel[...].dtype == param_dtype
  expected = reference(t5.ref, t5.ids)
  out = jit_call(model, t5.ids)["last_hidden_state"]
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
  tol = bf16_tolerance(TINY_T5["num_layers"])
  assert rel_l2(out, expected) <= tol, tol

  # T5 v1.1's hazard: feed-forward outputs beyond float16's range (transformers keeps wo in float32 and
  # clamps in float16). Scale wo so the residual stream passes 65504 in both models: the float32
  # residual stream and norms keep the bfloat16 forward finite and as close.
  scale = 3e4
  big_ref = copy.deepcopy(t5.ref)
  peaks = []
  hooks = [b.register_forward_hook(lambda m, a, o: peaks.append(float(o[0].abs().max())))
           for b in big_ref.encoder.block]
  with torch.no_grad():
    for block in big_ref.encoder.block:
      block.layer[1].DenseReluDense.wo.weight.mul_(scale)
  expected = reference(big_ref, t5.ids)
  for hook in hooks:
    hook.remove()
  assert max(peaks) > float(np.finfo(np.float16).max)
  for block in model.encoder.block:
    wo = block.layer[1].DenseReluDense.wo.kernel
    wo.set_value((wo[...].astype(jnp.float32) * scale).astype(param_dtype))
  out = jit_call(model, t5.ids)["last_hidden_state"]
  assert bool(jnp.isfinite(out).all()) and rel_l2(out, expected) <= tol


def test_load_save_load_is_byte_identical_and_transformers_loads_it(t5, tmp_path):
  save_t5_encoder(t5.model, tmp_path)
  original = convert.read_weights(t5.path, convert.TRANSFORMERS_STEM)
  saved = convert.read_weights(tmp_path, convert.TRANSFORMERS_STEM)
  assert sorted(saved) == sorted(original)  # shared.weight, no encoder.embed_tokens.weight: as save_pretrained
  for key, value in original.items():
    assert saved[key].dtype == value.dtype and saved[key].tobytes() == value.tobytes(), key
  again = load_t5_encoder(tmp_path)
  np.testing.assert_array_equal(jit_call(again, t5.ids)["last_hidden_state"],
                                jit_call(t5.model, t5.ids)["last_hidden_state"])
  from transformers import T5EncoderModel
  theirs, info = T5EncoderModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info
  np.testing.assert_array_equal(reference(theirs.eval(), t5.ids), reference(t5.ref, t5.ids))


def test_embedding_spellings_and_shards(t5, tmp_path):
  """Files with `encoder.embed_tokens.weight` only, or with both keys holding different tables (transformers
  then unties them and the encoder uses embed_tokens), sharded with an index: we compute what transformers
  computes on the same folder. Plus a whole T5's decoder keys, which the encoder ignores."""
  from transformers import T5EncoderModel
  weights = convert.read_weights(t5.path, convert.TRANSFORMERS_STEM)
  other = np.random.default_rng(3).standard_normal(weights["shared.weight"].shape).astype(np.float32)
  layouts = {
      "embed_tokens_only": {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                            for k, v in weights.items()},
      "both_differ": {**weights, "encoder.embed_tokens.weight": other,
                      "decoder.final_layer_norm.weight": weights["encoder.final_layer_norm.weight"]},
  }
  for name, tensors in layouts.items():
    folder = tmp_path / name
    convert.write_weights(folder, tensors, convert.TRANSFORMERS_STEM, max_shard_bytes=4096)
    assert (folder / "model.safetensors.index.json").is_file()  # really sharded
    (folder / "config.json").write_text((t5.path / "config.json").read_text())
    expected = reference(T5EncoderModel.from_pretrained(folder).eval(), t5.ids)
    out = jit_call(load_t5_encoder(folder), t5.ids)["last_hidden_state"]
    assert rel_l2(out, expected) <= F32_TOL, name
  assert rel_l2(out, reference(t5.ref, t5.ids)) > 0.01  # the differing table did change the result


def test_sharded_load_matches_unsharded(t5):
  mesh = sharding.make_mesh((1, 4, 2))
  model = load_t5_encoder(t5.path, mesh=mesh)
  attention = model.encoder.block[0].layer[0].SelfAttention
  assert attention.q.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert model.shared.embedding[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  bias = attention.relative_attention_bias.embedding[...]
  assert bias.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  np.testing.assert_array_equal(np.asarray(bias), np.asarray(t5.model.encoder.block[0].layer[0].SelfAttention
                                                             .relative_attention_bias.embedding[...]))
  out = jit_call(model, t5.ids)["last_hidden_state"]
  assert rel_l2(out, jit_call(t5.model, t5.ids)["last_hidden_state"]) <= 1e-6


# FLUX.1-dev's text_encoder_2/config.json (SD3's text_encoder_3 differs only in torch_dtype / version).
FLUX_T5_XXL = {
    "_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32128}


def test_t5_xxl_config_gives_transformers_keys_and_shapes():
  """On the real config, abstractly: every parameter's checkpoint key and shape is transformers'."""
  from transformers import T5Config as TorchT5Config, T5EncoderModel as TorchT5EncoderModel
  with torch.device("meta"):
    theirs = TorchT5EncoderModel(TorchT5Config(**FLUX_T5_XXL)).state_dict()
  theirs.pop("encoder.embed_tokens.weight")  # tied to shared.weight: not written
  model = nnx.eval_shape(lambda: T5EncoderModel(FLUX_T5_XXL, rngs=nnx.Rngs(0)))
  ours = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      shape = var.shape if str(path[-1]) != "kernel" else var.shape[::-1]
      ours[torch_key(path)] = tuple(shape)
  assert ours == {k: tuple(v.shape) for k, v in theirs.items()}
  assert model.cfg.dense_act_fn == "gelu_new" and model.cfg.is_gated_act


@pytest.mark.parametrize("change, message", [
    ({"model_type": "umt5"}, "model_type"),
    ({"architectures": ["T5ForSequenceClassification"]}, "architectures"),
    ({"is_decoder": True}, "is_decoder"),
    ({"feed_forward_proj": "gated-mish", "dense_act_fn": "mish"}, "dense_act_fn"),
    ({"feed_forward_proj": "gelu-gated"}, "feed_forward_proj"),
    ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
])
def test_unsupported_configs_fail_naming_the_key(change, message):
  with pytest.raises(ValueError, match=message):
    T5Config.from_dict({**FLUX_T5_XXL, **change})
