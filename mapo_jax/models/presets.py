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
