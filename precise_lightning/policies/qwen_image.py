"""Qwen-Image policy on the diffusers ``QwenImagePipeline`` components."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel
from torch import Tensor, nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from precise_lightning.architectures.parts import Size, capped
from precise_lightning.architectures.tokenizers import qwen3_tokenizer
from precise_lightning.policies.pipeline import PackedLatentPolicy, denoiser_dtype
from precise_lightning.sampling import FluxGrid

QWEN_IMAGE = "Qwen/Qwen-Image"
# The config.json of each component of Qwen/Qwen-Image (transformer/, text_encoder/ (Qwen2.5-VL-7B-Instruct: its
# text_config and vision_config), vae/, scheduler/), the architecture keys as published, transcribed (the hub cannot
# be reached from this machine: not yet checked against a download).
PUBLISHED: dict[str, dict[str, Any]] = {
    "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56]),
    "text_encoder": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-06,
        rope_theta=1000000.0, tie_word_embeddings=False, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "vision_encoder": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]),
    "scheduler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
}


class QwenImagePolicy(PackedLatentPolicy):
    """Qwen-Image: Qwen2.5-VL prompt embeddings with their padding mask (the pipeline's ``encode_prompt``, its
    system template's tokens dropped), latents kept as the VAE's ``[C, H/8, W/8]`` grid and packed into 2x2 tokens
    for each transformer call, decoded with the VAE's per-channel mean and std, sampled on the scheduler's
    dynamically shifted grid stretched to its terminal time (``FluxGrid``).

    Its guidance is true classifier-free guidance whose result is rescaled, token by token, to the norm of the
    conditional velocity (the pipeline's and Flow-GRPO's, :meth:`guide`); prompts and the negative prompt are
    encoded in one batch and padded to one length, as Flow-GRPO's rollout does, so both halves run in one forward.
    ``max_sequence_length`` defaults to the pipeline's 512. Other arguments: :class:`PipelinePolicy`'s.
    """

    hub_id = QWEN_IMAGE
    pipeline_class = QwenImagePipeline
    frozen = ("text_encoder", "vae")

    def __init__(self, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(max_sequence_length=max_sequence_length, **kwargs)

    @staticmethod
    def build(size: Size = "tiny", depth: int | None = None) -> QwenImagePipeline:
        """Qwen-Image: a 60-block MMDiT over 2x2-packed 16-channel latents reading Qwen2.5-VL-7B's last hidden
        layer, the Qwen-Image (Wan-style, one frame) VAE with per-channel latent statistics, the scheduler's dynamic
        exponential shift with terminal time 0.02."""
        real = PUBLISHED
        tokenizer = qwen3_tokenizer()  # the same Qwen2 byte-level BPE class and chat tokens
        if size == "tiny":
            text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1,
                        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
            vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                          fullatt_block_indexes=[0])
            transformer = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
            vae = dict(real["vae"], base_dim=8, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
        else:
            text = real["text_encoder"] | capped(real["text_encoder"], "num_hidden_layers", depth)
            vision = real["vision_encoder"] | capped(real["vision_encoder"], "depth", depth)
            transformer = real["transformer"] | capped(real["transformer"], "num_layers", depth)
            vae = dict(real["vae"])
        return QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]), vae=AutoencoderKLQwenImage(**vae),
            text_encoder=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text,
                                                                              vision_config=vision)),
            tokenizer=tokenizer, transformer=QwenImageTransformer2DModel(**transformer),
        )

    def default_grid(self) -> FluxGrid:
        """``linspace(1, 1/N, N)`` shifted by the scheduler's mu at this resolution's latent tokens, stretched to its
        terminal time."""
        c = self.pipeline.scheduler.config
        return FluxGrid(self.latent_shape[1] * self.latent_shape[2] // 4, c.base_image_seq_len, c.max_image_seq_len,
                        c.base_shift, c.max_shift, c.shift_terminal)

    def pipeline_call_arguments(self, latents: Tensor) -> dict[str, Any]:
        return super().pipeline_call_arguments(latents) | {"guidance_scale": None}

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"embeds": [B, L, D], "mask": [B, L] bool}: the pipeline's embeddings, zero-padded to the batch's longest."""
        embeds, mask = self.pipeline.encode_prompt(prompt=prompts, device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return {"embeds": embeds, "mask": mask}

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        if self.guidance_scale == 1:
            return self.encode_prompts(prompts)
        both = self.encode_prompts([*prompts, self.negative_prompt])  # one length for both halves of the forward
        return {k: v[:-1] for k, v in both.items()} | {
            f"neg_{k}": v[-1:].expand(len(prompts), *v.shape[1:]) for k, v in both.items()}

    def transformer_velocity(self, net: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        pipe, dtype = self.pipeline, denoiser_dtype(net)
        b, c, h, w = x.shape
        v = net(hidden_states=pipe._pack_latents(x, b, c, h, w).to(dtype), timestep=(t * 1000).expand(b) / 1000,
                encoder_hidden_states=cond["embeds"].to(dtype), encoder_hidden_states_mask=cond["mask"],
                img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return _unpack(v, c, h, w)

    def guide(self, v_uncond: Tensor, v_cond: Tensor) -> Tensor:
        """CFG rescaled to the conditional velocity's norm over each 2x2 token's values (QwenImagePipeline.__call__;
        Flow-GRPO's train_qwenimage.py compute_log_prob)."""
        guided = super().guide(v_uncond, v_cond)
        b, c, h, w = guided.shape
        pack = lambda v: self.pipeline._pack_latents(v, b, c, h, w)  # noqa: E731  [B, tokens, 4C]
        ratio = pack(v_cond).norm(dim=-1, keepdim=True) / pack(guided).norm(dim=-1, keepdim=True)
        return _unpack(pack(guided) * ratio, c, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        latents = latents.unsqueeze(2).to(self.vae.dtype)  # one frame; the statistics applied as the pipeline does
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        images = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()


def _unpack(tokens: Tensor, c: int, h: int, w: int) -> Tensor:
    """[B, (h/2)(w/2), 4C] tokens back to the [B, C, h, w] grid (inverse of the pipeline's ``_pack_latents``)."""
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
