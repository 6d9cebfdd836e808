"""diffusers / transformers checkpoint layouts ⇄ mapo_jax parameters."""
from mapo_jax.convert.files import (DIFFUSERS_STEM, NUMPY_DTYPES, TRANSFORMERS_STEM, LazyTensor, find_weights,
                                    open_weights, read_weights, write_weights)
from mapo_jax.convert.params import (CheckpointMismatchError, host_params, load_state_dict, state_dict,
                                     torch_key)
from mapo_jax.convert.folders import load_model, model_folder, read_config, save_model, with_defaults
