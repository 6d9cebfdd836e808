"""Diffusion-DPO LoRA on FLUX.1-dev. No published run trains FLUX.1-dev's text-to-image transformer with
Diffusion-DPO; the nearest is Follow-Your-Preference (Shen et al., arXiv 2509.23082; shenytzzz/Follow-Your-Preference
`scripts/train_flux_dpo.py` and `configs/configs_flux.yaml`, commit 6aaa2023), a full DPO fine-tune of FLUX.1
Fill-dev, which gives the objective's values. The flow-matching draws, the guidance and the LoRA layout are those of
diffusers' FLUX LoRA script (huggingface/diffusers `examples/dreambooth/train_dreambooth_lora_flux.py`, commit
58eb52c0). The reference is the transformer with the adapters switched off (no second transformer).

    python -m mapo_jax.encode --pipeline /models/flux1-dev --data /data/pickapic --out /data/flux_cache \
        --resolution 1024
    python -m mapo_jax.train --config configs/flux_dpo_lora.py --workdir /runs/flux_dpo_lora \
        --config.pipeline=/models/flux1-dev --config.data.cache_dir=/data/flux_cache

Architecture for `python -m mapo_jax.aot` (from the file name): "flux1_dev" (models/presets.py).

| key | value | source |
|---|---|---|
| objective | "dpo" | train_flux_dpo.py: `inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)`, `-logsigmoid` (l. 1439-1441): Diffusion-DPO's loss and sign on velocity errors |
| dpo.beta | 2000.0 | configs_flux.yaml `beta_dpo: 2000` |
| flow.weighting_scheme | "none" | configs_flux.yaml `weighting_scheme: none`; train_dreambooth_lora_flux.py `--weighting_scheme` default "none" |
| flow.guidance | 3.5 | train_dreambooth_lora_flux.py `--guidance_scale` default 3.5 (FLUX.1-dev's guidance embedding) |
| lora.rank | 4 | train_dreambooth_lora_flux.py `--rank` default 4 |
| lora.alpha | 4.0 | train_dreambooth_lora_flux.py `--lora_alpha` default 4 |
| lora.targets | ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2") | train_dreambooth_lora_flux.py's `target_modules` when `--lora_layers` is not given |
| optim.lr | 1e-05 | configs_flux.yaml `learning_rate: 1.0e-05` (also diffusers' SDXL DPO-LoRA recipe, configs/sdxl_dpo_lora.py) |
| optim.schedule | "constant" | configs_flux.yaml `lr_scheduler: constant` |
| optim.weight_decay | 0.01 | configs_flux.yaml `adam_weight_decay: 0.01` |
| optim.clip_norm | 1.0 | configs_flux.yaml `max_grad_norm: 1.0` |
| global_batch_size | 8 | configs_flux.yaml `train_batch_size: 1` x accelerate_flux.yaml `num_processes: 8`, no accumulation |
| accum_steps | 1 | configs_flux.yaml `gradient_accumulation_steps: 1` |
| steps | 2000 | configs_flux.yaml `train_steps: 2000` |
| data.empty_prompt_prob | 0.0 | configs_flux.yaml `proportion_empty_prompts: 0` (a guidance-distilled model has no unconditional branch) |
| resolution | 1024 | ours: FLUX.1-dev's native size (the Fill run trains at 512) |
| sample_guidance | 3.5 | FluxPipeline `guidance_scale` default: the embedded guidance, no classifier-free branch |
| sample_steps | 28 | FluxPipeline `num_inference_steps` default |

Where ours deviates, and why:
- LoRA instead of the Fill run's full fine-tune (the file name says so); A drawn as PEFT's default (kaiming-uniform)
  instead of the script's `init_lora_weights="gaussian"`; B = 0 either way, so step 0 is the base model exactly.
- bf16 compute on float32 adapters, base in bf16 (`lora.base_dtype`), as the scripts' `--mixed_precision bf16`.
- Per-sample losses weigh the reference's errors like the policy's (weights are 1 here, so the same numbers).
"""
from mapo_jax.config import base_config

FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


def get_config():
  config = base_config()
  config.objective = "dpo"
  config.dpo.beta = 2000.0
  config.flow.weighting_scheme, config.flow.guidance = "none", 3.5
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 4.0, FLUX_LORA_TARGETS
  config.global_batch_size, config.accum_steps, config.steps = 8, 1, 2000
  config.sample_guidance, config.sample_steps = 3.5, 28
  return config
