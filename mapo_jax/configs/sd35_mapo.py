"""MaPO on Stable Diffusion 3.5 medium (full fine-tune): the official MaPO recipe (configs/sdxl_mapo.py: mapo-t2i/mapo
README and the defaults of its `args.py`, `train.py`, `utils.py`) on the SD3 family, with the flow-matching draws of
diffusers' SD3 script (huggingface/diffusers `examples/dreambooth/train_dreambooth_lora_sd3.py`, commit 58eb52c0).
MaPO has not been published on a flow-matching model: its loss on velocity errors, T = the scheduler's
num_train_timesteps (1000) and snr 0.5 unchanged, is our construction (docs/objectives.md, "Flow matching").

    python -m mapo_jax.encode --pipeline /models/sd35-medium --data /data/pickapic --out /data/sd35_cache \
        --resolution 1024
    python -m mapo_jax.train --config configs/sd35_mapo.py --workdir /runs/sd35_mapo \
        --config.pipeline=/models/sd35-medium --config.data.cache_dir=/data/sd35_cache

Architecture for `python -m mapo_jax.aot` (from the file name): "sd35_medium" (models/presets.py).

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
| optim.weight_decay | 0.01 | `--adam_weight_decay` default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout in train.py |
| data.label_noise_prob | 0.0 | `--label_noise_prob` default off |
| data.time_ids | "original" | SD3 takes no time ids (the cache's are ignored; "fixed" fails on a flow schedule) |
| flow.weighting_scheme | "logit_normal" | train_dreambooth_lora_sd3.py `--weighting_scheme` default "logit_normal", weight 1 |
| flow.logit_mean | 0.0 | `--logit_mean` default 0.0 |
| flow.logit_std | 1.0 | `--logit_std` default 1.0 |
| resolution | 1024 | the MaPO README's `--resolution` default; SD3.5 medium's native size too |
| vae | "" | the pipeline's own VAE (the fp16-fix VAE is SDXL's) |
| sample_guidance | 7.0 | StableDiffusion3Pipeline `guidance_scale` default (classifier-free) |
| sample_steps | 28 | StableDiffusion3Pipeline `num_inference_steps` default |

Where ours deviates, and why:
- The velocity target noise - x0, not the SD3 script's default `--precondition_outputs 1` (x0 target, model output
  preconditioned as x_t - sigma v): that error is sigma^2 times the velocity error, a per-sample weight that would
  rescale MaPO's scores by sigma^2; the FLUX script and every published flow-model DPO (flow_grpo, Linear-DPO) regress
  the velocity.
- float32 AdamW instead of 8-bit, bf16 compute on float32 master weights (as configs/sdxl_mapo.py).
"""
from mapo_jax.config import base_config


def get_config():
  config = base_config()
  config.flow.weighting_scheme = "logit_normal"
  config.sample_guidance, config.sample_steps = 7.0, 28
  return config
