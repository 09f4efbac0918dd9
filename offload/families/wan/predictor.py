"""One Wan DiT pass per guidance branch, with the conditioning on the compute device."""

from __future__ import annotations

import torch

from ...core.denoise import Branch, Conditioning


class WanNoisePredictor:
    """Runs a ``WanTransformer3DModel`` for the conditional or unconditional branch of one step.

    Image-to-video models take the start image's mask and latents concatenated to the noisy latents along the
    channels, and (Wan2.1 I2V) its CLIP features through ``encoder_hidden_states_image``.
    """

    def __init__(self, transformer: torch.nn.Module, conditioning: Conditioning, device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.dtype = dtype
        self.text = {"cond": conditioning.prompt_embeds.to(device=device, dtype=dtype)}
        if conditioning.negative_prompt_embeds is not None:
            self.text["uncond"] = conditioning.negative_prompt_embeds.to(device=device, dtype=dtype)
        self.has_uncond = "uncond" in self.text
        self.image_embeds = None
        if conditioning.image_embeds is not None:
            self.image_embeds = conditioning.image_embeds.to(device=device, dtype=dtype)
        self.image_condition = None
        if conditioning.image_condition is not None:
            self.image_condition = conditioning.image_condition.to(device=device, dtype=dtype)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch) -> torch.Tensor:
        latent_input = latents.to(self.dtype)
        if self.image_condition is not None:
            latent_input = torch.cat([latent_input, self.image_condition], dim=1)
        return self.transformer(
            hidden_states=latent_input,
            timestep=timestep,
            encoder_hidden_states=self.text[branch],
            encoder_hidden_states_image=self.image_embeds,
            return_dict=False,
        )[0]
