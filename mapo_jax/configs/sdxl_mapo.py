"""MaPO on SDXL base 1.0, the official recipe: mapo-t2i/mapo README (`accelerate launch train.py ...`) and
the defaults of its `args.py`, `train.py` and `utils.py`.

    python -m mapo_jax.encode --pipeline /models/sdxl-base --vae /models/sdxl-vae-fp16-fix --data /data/pickapic \
        --out /data/cache_fp16fix --resolution 1024
    python -m mapo_jax.train --config configs/sdxl_mapo.py --workdir /runs/mapo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache_fp16fix

Every value (tests/test_config.py checks this table against the resolved config):

| key | value | source |
|---|---|---|
| objective | "mapo" | train.py |
| mapo.beta | 0.1 | `--beta_mapo` default 0.1 |
| mapo.snr | 0.5 | `--snr_value` default 0.5 |
| global_batch_size | 128 | `--train_batch_size=8` x `--gradient_accumulation_steps=2` x 8 GPUs |
| accum_steps | 2 | `--gradient_accumulation_steps=2` |
| optim.lr | 1e-05 | `--learning_rate=1e-5` |
| optim.schedule | "constant" | `--lr_scheduler="constant"` |
| optim.warmup_steps | 0 | `--lr_warmup_steps=0` |
| steps | 2000 | `--max_train_steps=2000` |
| optim.name | "adamw" | `--use_8bit_adam`: bitsandbytes AdamW8bit |
| optim.b1 | 0.9 | `--adam_beta1` default |
| optim.b2 | 0.999 | `--adam_beta2` default |
| optim.eps | 1e-08 | `--adam_epsilon` default |
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0, always applied |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout in train.py |
| data.time_ids | "original" | utils.py `compute_time_ids(original_size, crop_top_left)` per image |
| data.label_noise_prob | 0.0 | `--label_noise_prob` default None (off) |
| data.random_crop | False | `--random_crop` off (centre crop); random flip on (`--no_hflip` off), as ours |
| vae | "/models/sdxl-vae-fp16-fix" | `--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix` (download it there) |
| resolution | 1024 | `--resolution` default |

Where ours deviates, and why:
- float32 AdamW instead of bitsandbytes' 8-bit AdamW: no 8-bit optimizer state in optax; float32 moments
  are the more precise of the two.
- bf16 compute on float32 master weights; the README runs `--mixed_precision="fp16"` (bf16 is TPU-native
  and needs no loss scaling).

Target slice: v5p-8 (4 chips, 95 GiB each). The 128 pairs run as written, 2 micro-batches of 16 pairs per chip, at a
peak of 44.78 GiB per chip (`python -m mapo_jax.aot --config configs/sdxl_mapo.py --topology v5p-8`; bench/RESULTS.md).
On v5litepod-8 (8 chips, 16 GiB each) 2 pairs per chip fit (10.06 GiB): add `--config.accum_steps=8` there for the
same 128 pairs per step. On v6e-8 (8 chips, 32 GiB each) it runs as written, 2 micro-batches of 8 pairs per chip, at
28.70 GiB (`--topology v6e-8`).
"""
from mapo_jax.config import SDXL_FP16_FIX_VAE, base_config


def get_config():
  config = base_config()
  config.vae = SDXL_FP16_FIX_VAE
  return config
