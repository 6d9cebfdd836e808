"""The Flax CLIP text towers against transformers on tiny random checkpoints, plus loading rules."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from conftest import jit_call, make_clip_text_model, rel_l2
from mapo_jax.models import CLIPTextModel, load_text_encoder, save_text_encoder

VOCAB, EOS = 64, 7  # EOS 7 is not the largest id, so the two pooling rules pick different positions
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24)
CLIP_L = dict(architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              model_type="clip_text_model")
OPENCLIP_BIGG = dict(architectures=["CLIPTextModelWithProjection"], vocab_size=49408, hidden_size=1280,
                     intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                     model_type="clip_text_model")
# (projection head, activation, eos_token_id): 2 selects transformers' legacy argmax-of-ids pooling.
CASES = [(False, "quick_gelu", 2), (False, "gelu", EOS), (True, "gelu", 2), (True, "quick_gelu", EOS)]


def token_ids(eos_token_id):
  """Sequences of 77: BOS, words, EOS, then EOS padding (so only the first EOS is the right one)."""
  eos = VOCAB - 1 if eos_token_id == 2 else eos_token_id  # the argmax rule relies on EOS being the largest id
  rng = np.random.default_rng(0)
  ids = np.full((4, 77), eos, np.int32)
  ids[:, 0] = 0
  for row, length in enumerate([0, 5, 30, 75]):
    ids[row, 1:length + 1] = rng.integers(8, VOCAB - 1, length)
  return ids


@pytest.mark.parametrize("projection, act, eos_token_id", CASES)
def test_matches_transformers(projection, act, eos_token_id, tmp_path):
  ref = make_clip_text_model({**TINY, "hidden_act": act, "eos_token_id": eos_token_id}, projection=projection)
  ref.save_pretrained(tmp_path)
  ids = token_ids(eos_token_id)
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
  out = jit_call(load_text_encoder(tmp_path), ids)
  assert len(out["hidden_states"]) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
  for ours, theirs in zip(out["hidden_states"], expected.hidden_states):
    assert rel_l2(ours, theirs.numpy()) <= 1e-5
  assert rel_l2(out["last_hidden_state"], expected.last_hidden_state.numpy()) <= 1e-5
  if projection:
    assert rel_l2(out["text_embeds"], expected.text_embeds.numpy()) <= 1e-5
    # WithProjection's output carries no pooler_output: pool its last hidden state by the same rule
    expected_pooled = ref.text_model(torch.from_numpy(ids).long()).pooler_output.detach()
  else:
    assert "text_embeds" not in out
    expected_pooled = expected.pooler_output
  assert rel_l2(out["pooler_output"], expected_pooled.numpy()) <= 1e-5


def test_eos_rules_pick_different_positions():
  """Guards the test above: on these ids the two rules disagree, so both are exercised."""
  ids = token_ids(EOS)
  assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).any()


@pytest.fixture(scope="module")
def tiny_projection(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_projection")
  ref = make_clip_text_model({**TINY, "eos_token_id": EOS}, projection=True)
  ref.save_pretrained(path)
  return ref, path


def test_hub_layout_with_position_ids_and_shards_load(tmp_path):
  """Hub files prefix `text_model.` (transformers 5 saves a bare CLIPTextModel without it) and older ones
  keep the position_ids buffer; big towers come sharded."""
  ref = make_clip_text_model({**TINY, "eos_token_id": EOS})
  ref.save_pretrained(tmp_path / "v5")
  hub = {f"text_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
  hub["text_model.embeddings.position_ids"] = torch.arange(77)[None]
  (tmp_path / "hub").mkdir()
  (tmp_path / "hub" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
  save_file(hub, tmp_path / "hub" / "model.safetensors")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  states = [nnx.state(load_text_encoder(tmp_path / name), nnx.Param) for name in ("v5", "hub", "sharded")]
  for other in states[1:]:
    jax.tree.map(np.testing.assert_array_equal, states[0], other)


def test_save_text_encoder_loads_in_transformers(tiny_projection, tmp_path):
  from transformers import CLIPTextModelWithProjection
  ref, path = tiny_projection
  save_text_encoder(load_text_encoder(path), tmp_path)
  reloaded, info = CLIPTextModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  for key, value in ref.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("change, key", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"model_type": "clip"}, "model_type"),
    ({"architectures": ["CLIPModel"]}, "architectures"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
])
def test_unsupported_config_names_the_key(change, key):
  with pytest.raises(ValueError, match=key):
    CLIPTextModel({**TINY, **change}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("config, count", [(CLIP_L, 123_060_480), (OPENCLIP_BIGG, 694_659_840)])
def test_full_size_parameter_counts(config, count):
  model = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == count
