"""MaPO LoRA on FLUX.1-dev: the official MaPO LoRA recipe (configs/sdxl_mapo_lora.py: mapo-t2i/mapo README and
`train_with_lora.py`) on the FLUX family, with the flow-matching draws, the guidance and the LoRA layout of diffusers'
FLUX LoRA script (huggingface/diffusers `examples/dreambooth/train_dreambooth_lora_flux.py`, commit 58eb52c0). MaPO
has not been published on a flow-matching model: its loss on velocity errors, T = the scheduler's
num_train_timesteps (1000) and snr 0.5 unchanged, is our construction (docs/objectives.md, "Flow matching").

    python -m mapo_jax.encode --pipeline /models/flux1-dev --data /data/pickapic --out /data/flux_cache \
        --resolution 1024
    python -m mapo_jax.train --config configs/flux_mapo_lora.py --workdir /runs/flux_mapo_lora \
        --config.pipeline=/models/flux1-dev --config.data.cache_dir=/data/flux_cache

Architecture for `python -m mapo_jax.aot` (from the file name): "flux1_dev" (models/presets.py).

| key | value | source |
|---|---|---|
| objective | "mapo" | train_with_lora.py `--mapo_training` loss |
| mapo.beta | 0.1 | `--beta_mapo` default 0.1 |
| mapo.snr | 0.5 | `--snr_value` default 0.5 |
| global_batch_size | 128 | the MaPO README's 8 per GPU x 2 accumulation x 8 GPUs |
| accum_steps | 2 | `--gradient_accumulation_steps=2` |
| optim.lr | 1e-05 | the MaPO README's `--learning_rate=1e-5` |
| optim.schedule | "constant" | `--lr_scheduler="constant"` |
| optim.clip_norm | 1.0 | `--max_grad_norm` default 1.0 |
| steps | 2000 | `--max_train_steps=2000` |
| data.empty_prompt_prob | 0.0 | no empty-prompt dropout |
| data.label_noise_prob | 0.0 | `--label_noise_prob` default off |
| flow.weighting_scheme | "none" | train_dreambooth_lora_flux.py `--weighting_scheme` default "none": uniform u, weight 1 |
| flow.guidance | 3.5 | train_dreambooth_lora_flux.py `--guidance_scale` default 3.5 (FLUX.1-dev's guidance embedding) |
| lora.rank | 4 | train_dreambooth_lora_flux.py `--rank` default 4 |
| lora.alpha | 4.0 | train_dreambooth_lora_flux.py `--lora_alpha` default 4 |
| lora.targets | ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2") | train_dreambooth_lora_flux.py's `target_modules` when `--lora_layers` is not given |
| resolution | 1024 | the MaPO README's `--resolution` default 1024, FLUX.1-dev's native size too |
| vae | "" | the pipeline's own VAE (the fp16-fix VAE is SDXL's) |
| sample_guidance | 3.5 | FluxPipeline `guidance_scale` default: the embedded guidance, no classifier-free branch |
| sample_steps | 28 | FluxPipeline `num_inference_steps` default |

Where ours deviates, and why: as configs/sdxl_mapo_lora.py (float32 AdamW instead of 8-bit, bf16 instead of fp16,
A drawn as PEFT's default). The LoRA shape is the FLUX script's (rank 4 on attention and feed-forward layers)
rather than MaPO's SDXL UNet attention projections at rank 8: those module names do not exist in FLUX's
single-stream blocks, and the script is the family's published LoRA layout.
"""
from mapo_jax.config import base_config

# train_dreambooth_lora_flux.py's default `target_modules` (the same tuple as configs/flux_dpo_lora.py).
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


def get_config():
  config = base_config()
  config.flow.weighting_scheme, config.flow.guidance = "none", 3.5
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 4.0, FLUX_LORA_TARGETS
  config.sample_guidance, config.sample_steps = 3.5, 28
  return config
