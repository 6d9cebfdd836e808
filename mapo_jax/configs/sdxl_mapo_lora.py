"""MaPO LoRA on SDXL base 1.0: the official MaPO recipe (configs/sdxl_mapo.py, every value of its table) with the
LoRA of the official `train_with_lora.py` (mapo-t2i/mapo): PEFT adapters on the attention projections with
`lora_alpha = lora_rank`, saved with diffusers' `save_lora_weights` (our WORKDIR/export/ writes the same format).

    python -m mapo_jax.train --config configs/sdxl_mapo_lora.py --workdir /runs/mapo_lora \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache_fp16fix

Every value (tests/test_config.py checks this table against the resolved config); the rest as sdxl_mapo.py:

| key | value | source |
|---|---|---|
| objective | "mapo" | train_with_lora.py `--mapo_training` loss |
| lora.rank | 8 | `--lora_rank` is required there, without a default: 8, as diffusers' DPO-LoRA recipe |
| lora.alpha | 8.0 | `LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank)`: scale 1 |
| lora.targets | ("to_q", "to_k", "to_v", "to_out.0") | `target_modules=["to_k", "to_q", "to_v", "to_out.0"]` |
| mapo.beta | 0.1 | `--beta_mapo` default 0.1 |
| global_batch_size | 128 | the MaPO README's 8 per GPU x 2 accumulation x 8 GPUs |
| accum_steps | 2 | `--gradient_accumulation_steps=2` |
| optim.lr | 1e-05 | the README's `--learning_rate=1e-5` |
| optim.schedule | "constant" | `--lr_scheduler="constant"` |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout |
| data.time_ids | "original" | utils.py `compute_time_ids` per image |
| data.label_noise_prob | 0.0 | `--label_noise_prob` default off |
| vae | "/models/sdxl-vae-fp16-fix" | `--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix` |
| lora.base_dtype | "bfloat16" | train_with_lora.py casts the frozen UNet to the mixed-precision dtype (fp16) |

Where ours deviates, and why: as configs/sdxl_mapo.py, and A drawn as PEFT's default (kaiming-uniform)
instead of `init_lora_weights="gaussian"` (A ~ N(0, std 1/r)); B = 0 either way, so step 0 is the base model exactly.

Target slice: v5litepod-8 (8 chips, 16 GiB each). The 128 pairs run as written, 2 micro-batches of 8 pairs per chip:
that micro-batch peaks at 14.02 GiB per chip (`python -m mapo_jax.aot --config configs/sdxl_mapo_lora.py --topology
v5litepod-8 --config.global_batch_size=64 --config.accum_steps=1`, one micro-batch of the same size;
bench/RESULTS.md).
"""
from mapo_jax.config import SDXL_FP16_FIX_VAE, base_config


def get_config():
  config = base_config()
  config.vae = SDXL_FP16_FIX_VAE
  config.lora.rank, config.lora.alpha = 8, 8.0
  return config
