"""Diffusion-DPO on Stable Diffusion 3.5 medium (full fine-tune), after the published offline Diffusion-DPO run on SD3
medium: the Diffusion-DPO baseline of Linear-DPO (Li et al., arXiv 2605.21123; WhynotChen0105/Linear-DPO
`run_sd3_pickapic.sh` and `train/train_sd3_dpo.py`, commit b273b952). The frozen reference is the starting pipeline
(`reference` = "").

    python -m mapo_jax.encode --pipeline /models/sd35-medium --data /data/pickapic --out /data/sd35_cache \
        --resolution 1024
    python -m mapo_jax.train --config configs/sd35_dpo.py --workdir /runs/sd35_dpo \
        --config.pipeline=/models/sd35-medium --config.data.cache_dir=/data/sd35_cache

Architecture for `python -m mapo_jax.aot` (from the file name): "sd35_medium" (models/presets.py).

| key | value | source |
|---|---|---|
| objective | "dpo" | train_sd3_dpo.py: `inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)`, `-logsigmoid` (l. 1210-1221): Diffusion-DPO's loss and sign on velocity errors |
| dpo.beta | 1000.0 | run_sd3_pickapic.sh `BETA=1000` |
| optim.lr | 5e-06 | run_sd3_pickapic.sh `LR=5e-6` (no `--scale_lr`) |
| global_batch_size | 128 | `--train_batch_size=1` x `ACCUMULATION_STEPS=16` x `WORLD_SIZE=8` |
| accum_steps | 16 | `--gradient_accumulation_steps=16` |
| steps | 1000 | `--max_train_steps=1000` |
| optim.schedule | "constant" | `--lr_scheduler="constant_with_warmup" --lr_warmup_steps=0`: constant |
| optim.warmup_steps | 0 | `--lr_warmup_steps=0` |
| optim.name | "adamw" | train_sd3_dpo.py `--optimizer` default AdamW |
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| flow.weighting_scheme | "none" | train_sd3_dpo.py: `indices = torch.randint(0, num_train_timesteps)` (l. 1151), uniform over the scheduler's timesteps, weight 1 |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout in train_sd3_dpo.py |
| data.time_ids | "original" | SD3 takes no time ids (the cache's are ignored; "fixed" fails on a flow schedule) |
| resolution | 1024 | train_sd3_dpo.py: `--resolution` None becomes 1024 (l. 432-433) |
| vae | "" | the pipeline's own VAE |
| sample_guidance | 7.0 | StableDiffusion3Pipeline `guidance_scale` default (classifier-free) |
| sample_steps | 28 | StableDiffusion3Pipeline `num_inference_steps` default |

Where ours deviates, and why:
- SD3.5 medium instead of the run's SD3 medium: the same family, scheduler (shift 3) and training draws.
- The velocity target (as train_sd3_dpo.py, l. 1177), not diffusers' SD3 script's `--precondition_outputs`.
- bf16 compute on float32 master weights, the reference stored in bf16; the run uses `--mixed_precision="fp16"`.
- accum_steps 16 over 8 devices, one pair per device per micro-batch: the run's split exactly.
The other published SD3.5-medium DPO, flow_grpo's `scripts/train_sd3_dpo.py` (config/dpo.py `beta = 100`, logit-normal
sigmas, LoRA), trains online on its own samples; its beta is not for offline Pick-a-Pic pairs.
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.dpo.beta = 1000.0
  config.optim.lr = 5e-6
  config.global_batch_size, config.accum_steps, config.steps = 128, 16, 1000
  config.flow.weighting_scheme = "none"
  config.sample_guidance, config.sample_steps = 7.0, 28
  return config
