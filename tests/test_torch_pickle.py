"""mapo_jax.convert.torch_pickle reads torch.save files as torch.load does, without torch, and runs no code."""
import collections
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch

from mapo_jax.convert import torch_pickle


def test_reads_what_torch_load_reads(tmp_path):
  base = torch.randn(4, 6)
  tensors = collections.OrderedDict(
      plain=base, transposed=base.T, sliced=base[1:, 2:5], scalar=torch.tensor(2.5), half=torch.randn(3, 2).half(),
      bfloat16=torch.randn(5).bfloat16(), int64=torch.arange(7), boolean=torch.tensor([True, False]),
      parameter=torch.nn.Parameter(torch.randn(2, 3)), empty=torch.zeros(0, 3))
  torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "x.pt")
  got = torch_pickle.load(tmp_path / "x.pt")
  assert got["epoch"] == 3 and list(got["state_dict"]) == list(tensors)
  for key, want in tensors.items():
    value = got["state_dict"][key]
    assert isinstance(value, np.ndarray) and value.shape == tuple(want.shape), key
    if want.dtype == torch.bfloat16:
      assert value.dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(value.astype(np.float32), want.float().numpy())
    else:
      assert value.dtype == want.detach().numpy().dtype, key
      np.testing.assert_array_equal(value, want.detach().numpy())


class Payload:
  def __reduce__(self):
    return (print, ("ran",))


def test_refuses_other_globals_and_legacy_files(tmp_path):
  torch.save({"x": torch.ones(1), "y": Payload()}, tmp_path / "evil.pt")
  with pytest.raises(pickle.UnpicklingError, match="references __builtin__.print"):  # protocol 2 names it so
    torch_pickle.load(tmp_path / "evil.pt")
  torch.save({"x": torch.ones(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match="legacy.pt is not a PyTorch zip checkpoint"):
    torch_pickle.load(tmp_path / "legacy.pt")
