"""Diffusion-DPO LoRA on SDXL base 1.0, the diffusers recipe: huggingface/diffusers
`examples/research_projects/diffusion_dpo` README ("SDXL training command") and the defaults of its
`train_diffusion_dpo_sdxl.py`. The reference is the same UNet with the adapters switched off (the script's
`disable_adapters()`; here the adapters' B = 0), so no second UNet is loaded.

    python -m mapo_jax.train --config configs/sdxl_dpo_lora.py --workdir /runs/dpo_lora \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache_fp16fix

Every value (tests/test_config.py checks this table against the resolved config):

| key | value | source |
|---|---|---|
| objective | "dpo" | the script's DPO loss |
| dpo.beta | 5000.0 | `--beta_dpo` default 5000 |
| lora.rank | 8 | `--rank=8` |
| lora.alpha | 8.0 | `LoraConfig(r=args.rank, lora_alpha=args.rank)`: scale 1 |
| lora.targets | ("to_q", "to_k", "to_v", "to_out.0") | `target_modules=["to_k", "to_q", "to_v", "to_out.0"]` |
| global_batch_size | 16 | `--train_batch_size=8` x `--gradient_accumulation_steps=2` (one GPU) |
| accum_steps | 2 | `--gradient_accumulation_steps=2` |
| optim.lr | 1e-05 | `--learning_rate=1e-5` (no `--scale_lr`) |
| optim.schedule | "constant" | `--lr_scheduler="constant"` |
| optim.warmup_steps | 0 | `--lr_warmup_steps=0` |
| steps | 2000 | `--max_train_steps=2000` |
| optim.name | "adamw" | `--use_8bit_adam`: bitsandbytes AdamW8bit |
| optim.b1 | 0.9 | `--adam_beta1` default |
| optim.b2 | 0.999 | `--adam_beta2` default |
| optim.eps | 1e-08 | `--adam_epsilon` default |
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout in the script |
| data.time_ids | "original" | `compute_time_ids(original_size, crops_coords_top_left)` per image |
| data.label_noise_prob | 0.0 | no label noise |
| vae | "/models/sdxl-vae-fp16-fix" | `--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix` |
| resolution | 1024 | `--resolution` default |
| lora.base_dtype | "bfloat16" | the script casts the frozen UNet to the mixed-precision dtype (fp16) |

Where ours deviates, and why:
- A drawn as PEFT's default (kaiming-uniform) instead of `init_lora_weights="gaussian"` (A ~ N(0, std 1/r));
  B = 0 either way, so step 0 is the base model exactly.
- float32 AdamW instead of 8-bit AdamW; bf16 base and compute instead of fp16 (no loss scaling on TPU).

Target slice: v5litepod-8 (8 chips, 16 GiB each). The 16 pairs run as written, 2 micro-batches of 1 pair per chip, at a
peak of 3.19 GiB per chip (`python -m mapo_jax.aot --config configs/sdxl_dpo_lora.py --topology v5litepod-8`;
bench/RESULTS.md).
"""
from mapo_jax.config import SDXL_FP16_FIX_VAE, base_config


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.lora.rank, config.lora.alpha = 8, 8.0
  config.global_batch_size, config.accum_steps = 16, 2
  config.vae = SDXL_FP16_FIX_VAE
  return config
