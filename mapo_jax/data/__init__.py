"""Preference-pair data: sources, pair rules, the encoded cache and the training loaders."""

from mapo_jax.data.cache import (BATCH_KEYS, ENCODED_KEYS, EncodeFn, EncodeSettings, encoded_vae, merge_caches,
                                 read_manifest,
                                 write_cache)
from mapo_jax.data.loader import cached_eval_batch, cached_loader, holdout_split, onthefly_eval_batch, onthefly_loader, to_global
from mapo_jax.data.pairs import BadPair, prepare_pair
from mapo_jax.data.sources import COLUMNS, JSONL_KEYS, SCORE_KEYS, RawRow, open_source
