"""Named UNet configs (diffusers config.json contents) for tests, benchmarks and random-weight runs.

SDXL base 1.0 and SD 1.5 are the published `unet/config.json` architectures; the tiny ones keep
their block layouts at a few thousand times smaller size.
"""

SDXL_BASE_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    center_input_sample=False, cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
    out_channels=4, projection_class_embeddings_input_dim=2816, resnet_time_scale_shift="default",
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=False,
    use_linear_projection=True)

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])

TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], cross_attention_dim=48,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)

TINY_SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=40, norm_num_groups=8)

TINY_SD2_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4, 4], cross_attention_dim=40, use_linear_projection=True, upcast_attention=True,
    norm_num_groups=8)


# The smallest SDXL-layout UNet (text_time conditioning, one attention level): train-step tests.
MICRO_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4], transformer_layers_per_block=1, cross_attention_dim=24,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=16 + 6 * 4, norm_num_groups=4)

UNETS = {"sdxl": SDXL_BASE_UNET, "sd15": SD15_UNET, "tiny": TINY_SDXL_UNET, "tiny_sd15": TINY_SD15_UNET,
         "tiny_sd2": TINY_SD2_UNET,
         "micro": MICRO_SDXL_UNET}

# The "tiny" layout of the PyTorch reference benchmark (`--torch-reference` in bench/train_step.py), so both
# implementations time the same architecture.
BENCH_TINY_UNET = dict(
    SDXL_BASE_UNET, attention_head_dim=[2, 4], block_out_channels=[32, 64], cross_attention_dim=32,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], norm_num_groups=8, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8)
UNETS["bench_tiny"] = BENCH_TINY_UNET


# --- FLUX.1 transformers (diffusers FluxTransformer2DModel config.json contents) ---------------------------------
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell `transformer/config.json`: 19 double-stream and 38 single-stream
# blocks, 24 heads x 128, T5 context 4096, CLIP pooled 768, 2x2-packed 16-channel latents (in 64). The published
# files leave axes_dims_rope at diffusers' default (16, 56, 56); it is written out here. Only dev is
# guidance-distilled (guidance_embeds: a guidance_embedder).
FLUX1_DEV_TRANSFORMER = dict(
    attention_head_dim=128, axes_dims_rope=[16, 56, 56], guidance_embeds=True, in_channels=64,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
    pooled_projection_dim=768)
FLUX1_SCHNELL_TRANSFORMER = dict(FLUX1_DEV_TRANSFORMER, guidance_embeds=False)

# The same layout (both block kinds, two of each, 3-axis RoPE summing to head_dim) at width 16.
TINY_FLUX_TRANSFORMER = dict(
    attention_head_dim=8, axes_dims_rope=[2, 2, 4], guidance_embeds=True, in_channels=16, joint_attention_dim=16,
    num_attention_heads=2, num_layers=2, num_single_layers=2, patch_size=1, pooled_projection_dim=12)
TINY_FLUX_SCHNELL_TRANSFORMER = dict(TINY_FLUX_TRANSFORMER, guidance_embeds=False)

# The tiny layout at FLUX.1's latent width, as a FluxPipeline packs it: 16 VAE channels in 2x2 patches (in_channels
# 64), T5 width 32, CLIP pooled width 16. The pipelines' tiny presets (aot, bench/unet_forward.py).
TINY_FLUX_PIPELINE_TRANSFORMER = dict(TINY_FLUX_TRANSFORMER, in_channels=64, joint_attention_dim=32,
                                      pooled_projection_dim=16)
TINY_FLUX_PIPELINE_SCHNELL_TRANSFORMER = dict(TINY_FLUX_PIPELINE_TRANSFORMER, guidance_embeds=False)

# Named FLUX transformers (aot --architecture); names are unique across families (the UNets have "tiny").
FLUX_TRANSFORMERS = {"flux1_dev": FLUX1_DEV_TRANSFORMER, "flux1_schnell": FLUX1_SCHNELL_TRANSFORMER,
                     "tiny_flux": TINY_FLUX_PIPELINE_TRANSFORMER,
                     "tiny_flux_schnell": TINY_FLUX_PIPELINE_SCHNELL_TRANSFORMER}


# --- SD3 / SD3.5 MMDiT transformers (diffusers SD3Transformer2DModel config.json contents) -----------------------
# stabilityai/stable-diffusion-3.5-medium and -large `transformer/config.json`. Checked against diffusers 0.42
# (loaders/single_file_utils.py): medium's position table has 147456 = 384² entries (SD3 medium's 36864 = 192²),
# its context adaLN 9216 = 6 · 1536 outputs (24 heads x 64); large has blocks 0..37, no attn2 (dual attention
# found from attn2 keys). The other values (large: pos_embed_max_size 192, 38 heads, caption 2432, qk rms_norm;
# both: sample_size 128, joint 4096, pooled 2048) agree across public copies of the published files; the large
# file carries no dual_attention_layers key (diffusers' default: none).
SD35_MEDIUM_TRANSFORMER = dict(
    attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)
SD35_LARGE_TRANSFORMER = dict(
    attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
    num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)

# Tiny layouts: SD3 (no qk norm, no dual attention; joint blocks then the context_pre_only last block) and SD3.5
# medium's (qk rms_norm, attn2 in the first half of the blocks, the last block plain). Width 32 (4 heads x 8);
# the position table (12², base 4 patches) is larger than the sample grid, as in the released models.
TINY_SD3_TRANSFORMER = dict(
    attention_head_dim=8, caption_projection_dim=32, in_channels=4, joint_attention_dim=24, num_attention_heads=4,
    num_layers=3, out_channels=4, patch_size=2, pooled_projection_dim=20, pos_embed_max_size=12, sample_size=8)
TINY_SD35_TRANSFORMER = dict(TINY_SD3_TRANSFORMER, num_layers=4, dual_attention_layers=[0, 1], qk_norm="rms_norm")

SD3_TRANSFORMERS = {"sd35_medium": SD35_MEDIUM_TRANSFORMER, "sd35_large": SD35_LARGE_TRANSFORMER,
                    "tiny_sd3": TINY_SD3_TRANSFORMER, "tiny_sd35": TINY_SD35_TRANSFORMER}
