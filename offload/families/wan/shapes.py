"""The shapes of the Wan2.1 family's components, as their Diffusers configs give them.

Speed depends on shapes, not values, so benchmarks and large-shape tests build random-weight models from these
instead of downloading checkpoints. One place, so every measurement uses the same models.
"""

from __future__ import annotations

WAN_DIT_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
"""``WanTransformer3DModel`` arguments shared by every Wan2.1 DiT."""

WAN_DIT = {
    "1.3B": dict(WAN_DIT_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(WAN_DIT_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
"""Text-to-video DiTs: dim 1536 (12 heads) and 5120 (40 heads)."""

UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, layer_norm_epsilon=1e-6,
)
"""``UMT5Config`` of the text encoder (google/umt5-xxl's encoder)."""

CLIP_VIT_H = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu",
)
"""``CLIPVisionConfig`` of the I2V image encoder (open-clip ViT-H/14)."""

WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
"""``AutoencoderKLWan`` arguments of the Wan2.1 VAE."""

WAN_SCHEDULER = dict(
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
)
"""The scheduler of the official Wan2.1 Diffusers folders (``UniPCMultistepScheduler``, diffusers' defaults for
every other field): what a model read from single files uses, since those carry no scheduler. Shift 3.0 suits
480p; 720p wants 5.0 (the Sample node's flow_shift)."""
