"""diffusers / transformers checkpoint layouts ⇄ mapo_jax parameters."""
from mapo_jax.convert.files import (DIFFUSERS_STEM, NUMPY_DTYPES, TRANSFORMERS_STEM, find_weights,
                                    read_weights, write_weights)
from mapo_jax.convert.params import CheckpointMismatchError, load_state_dict, state_dict, torch_key
from mapo_jax.convert.folders import load_model, model_folder, read_config, save_model, with_defaults
