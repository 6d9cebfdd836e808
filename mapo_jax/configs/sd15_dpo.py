"""Diffusion-DPO on Stable Diffusion 1.5 at 512 px, the official recipe: SalesforceAIResearch/DiffusionDPO
`launchers/sd15.sh` and the defaults of its `train.py`.

    python -m mapo_jax.train --config configs/sd15_dpo.py --workdir /runs/sd15_dpo \
        --config.pipeline=/models/sd15 --config.data.cache_dir=/data/cache512

Every value (tests/test_config.py checks this table against the resolved config):

| key | value | source |
|---|---|---|
| objective | "dpo" | train.py: DPO unless `--sft` |
| dpo.beta | 5000.0 | sd15.sh `--beta_dpo 5000` |
| global_batch_size | 2048 | 1 per GPU x `--gradient_accumulation_steps=128` x 16 GPUs ("Paper used 2048") |
| optim.lr | 2.048e-05 | `--learning_rate=1e-8 --scale_lr`: 1e-8 x 2048 |
| optim.schedule | "linear_warmup" | `--lr_scheduler="constant_with_warmup"` |
| optim.warmup_steps | 500 | `--lr_warmup_steps=500` |
| steps | 2000 | `--max_train_steps=2000` |
| optim.name | "adamw" | torch.optim.AdamW (no `--sdxl`, no `--use_adafactor`, no `--use_8bit_adam`) |
| optim.b1 | 0.9 | `--adam_beta1` default |
| optim.b2 | 0.999 | `--adam_beta2` default |
| optim.eps | 1e-08 | `--adam_epsilon` default |
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| data.empty_prompt_prob | 0.2 | `--proportion_empty_prompts` default 0.2 |
| data.label_noise_prob | 0.0 | no label noise in train.py |
| data.random_crop | False | `--random_crop` off (centre crop); random flip on, as ours |
| vae | "" | no `--pretrained_vae_model_name_or_path`: the pipeline's vae/ |
| resolution | 512 | `--resolution` default without `--sdxl` |

Where ours deviates, and why:
- bf16 compute on float32 master weights, reference stored in bf16; the launcher uses
  `--mixed_precision="fp16"` (bf16 is TPU-native and needs no loss scaling).
- accum_steps 16 over 8 devices (16 pairs per device per micro-batch): the same 2048 pairs per step.
- data.time_ids does not apply: SD 1.5's UNet takes no time ids.
- export in float32 (SD 1.5 checkpoints are usually shared in float32).
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config(), sdxl=False)
  config.resolution = 512
  config.accum_steps = 16  # 8 GPUs x 16 pairs per micro-batch x 16 = 2048
  config.export_dtype = "fp32"  # SD 1.5 checkpoints are usually shared in float32
  return config
