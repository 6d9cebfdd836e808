"""Diffusion-DPO on SDXL base 1.0, the official recipe: SalesforceAIResearch/DiffusionDPO `launchers/sdxl.sh`
and the defaults of its `train.py`. The frozen reference is the starting pipeline (`reference` = "").

    python -m mapo_jax.encode --pipeline /models/sdxl-base --vae /models/sdxl-vae-fp16-fix --data /data/pickapic \
        --out /data/cache_fp16fix --resolution 1024
    python -m mapo_jax.train --config configs/sdxl_dpo.py --workdir /runs/dpo \
        --config.pipeline=/models/sdxl-base --config.data.cache_dir=/data/cache_fp16fix

Every value (tests/test_config.py checks this table against the resolved config):

| key | value | source |
|---|---|---|
| objective | "dpo" | train.py: DPO unless `--sft` |
| dpo.beta | 5000.0 | sdxl.sh `--beta_dpo 5000` |
| global_batch_size | 2048 | 1 per GPU x `--gradient_accumulation_steps=128` x 16 GPUs ("Paper used 2048") |
| optim.lr | 2.048e-05 | `--learning_rate=1e-8 --scale_lr`: 1e-8 x 2048 |
| optim.schedule | "linear_warmup" | `--lr_scheduler="constant_with_warmup"` |
| optim.warmup_steps | 200 | `--lr_warmup_steps=200` |
| steps | 2000 | `--max_train_steps=2000` |
| optim.name | "adafactor" | train.py `if args.use_adafactor or args.sdxl`: transformers Adafactor |
| optim.weight_decay | 0.01 | Adafactor(`weight_decay=args.adam_weight_decay`), default 1e-2 |
| optim.clip_norm | 1.0 | `--max_grad_norm` 1.0; skipped only with `--use_adafactor`, which sdxl.sh does not pass |
| data.empty_prompt_prob | 0.2 | `--proportion_empty_prompts` default 0.2 |
| data.time_ids | "fixed" | train.py: `add_time_ids = [res, res, 0, 0, res, res]` for SDXL base |
| data.label_noise_prob | 0.0 | no label noise in train.py |
| data.random_crop | False | `--random_crop` off (centre crop); random flip on (`--no_hflip` off), as ours |
| vae | "/models/sdxl-vae-fp16-fix" | `--pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix` (download it there) |
| resolution | 1024 | `--resolution` default for `--sdxl` |

Where ours deviates, and why:
- bf16 compute on float32 master weights (`dtype`, `param_dtype`), reference stored in bf16
  (`ref_param_dtype`); the launcher runs `--mixed_precision="fp16"` (fp16 weights for the reference).
  bf16 is the TPU-native format and needs no loss scaling.
- accum_steps 16 on the target slice's 4 chips (32 pairs per chip per micro-batch) instead of 1 pair x 128 on
  16 GPUs: the same 2048 pairs per step; per-pair objectives are invariant to the split
  (mapo_jax/training/train_step.py).
- Adafactor from optax parts, as transformers' Adafactor where it maps (mapo_jax/training/optim.py lists the
  differences: which axes the second moment is factored over for conv kernels and small tensors).
- The empty prompt is drawn per pair from the step's key (mapo_jax/training/train_step.py `augment_batch`) instead
  of Python's `random`, so a resumed run takes the same choices.

Target slice: v5p-8 (4 chips, 95 GiB each). The 2048 pairs run as 16 micro-batches of 32 pairs per chip. That
micro-batch peaks at 77.55 GiB per chip in a compile of 4096 pairs per step (`python -m mapo_jax.aot --config
configs/sdxl_dpo.py --topology v5p-8 --config.global_batch_size=4096 --max-batch`; bench/RESULTS.md), which holds
the same micro-batch and twice this step's batch. The largest micro-batch that fits is 40 pairs per chip (91.25 GiB);
16 pairs per chip (`--config.accum_steps=32`) peak at 44.82 GiB. On v5litepod-8 (8 chips, 16 GiB each) 4 pairs per chip do not fit (17.61 GiB) and 2 do (12.63 GiB): add
`--config.accum_steps=128` there for the same 2048 pairs per step.
"""
from mapo_jax.config import base_config, use_dpo_recipe


def get_config():
  config = use_dpo_recipe(base_config())
  config.accum_steps = 16  # v5p-8: 4 chips x 32 pairs per micro-batch x 16 = 2048 (docstring: target slice)
  return config
