"""Diffusion-DPO LoRA on Stable Diffusion 1.5 at 512 px, the diffusers recipe: huggingface/diffusers
`examples/research_projects/diffusion_dpo` README ("SD training command") and the defaults of its
`train_diffusion_dpo.py`. The reference is the UNet with the adapters switched off; no second UNet.

    python -m mapo_jax.train --config configs/sd15_dpo_lora.py --workdir /runs/sd15_dpo_lora \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512

Every value (tests/test_config.py checks this table against the resolved config):

| key | value | source |
|---|---|---|
| objective | "dpo" | the script's DPO loss (`--loss_type` default "sigmoid") |
| dpo.beta | 2500.0 | `--beta_dpo` default 2500 (the README command does not set it) |
| lora.rank | 8 | `--rank=8` |
| lora.alpha | 8.0 | `LoraConfig(r=args.rank, lora_alpha=args.rank)`: scale 1 |
| lora.targets | ("to_q", "to_k", "to_v", "to_out.0") | `target_modules=["to_k", "to_q", "to_v", "to_out.0"]` |
| global_batch_size | 32 | `--train_batch_size=16` x `--gradient_accumulation_steps=2` (one GPU) |
| accum_steps | 2 | `--gradient_accumulation_steps=2` |
| optim.lr | 1e-05 | `--learning_rate=1e-5` |
| optim.schedule | "constant" | `--lr_scheduler="constant"` |
| optim.warmup_steps | 0 | `--lr_warmup_steps=0` |
| steps | 10000 | `--max_train_steps=10000` |
| optim.name | "adamw" | `--use_8bit_adam`: bitsandbytes AdamW8bit |
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout in the script |
| vae | "" | the pipeline's vae/ |
| resolution | 512 | `--resolution=512` |

Where ours deviates, and why: as configs/sdxl_dpo_lora.py (PEFT-default A, float32 AdamW, bf16).
data.time_ids does not apply: SD 1.5's UNet takes no time ids.
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.dpo.beta = 2500.0
  config.lora.rank, config.lora.alpha = 8, 8.0
  config.global_batch_size, config.accum_steps = 32, 2
  config.steps = 10000
  config.resolution = 512
  return config
