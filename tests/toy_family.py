"""A toy second model family, defined entirely outside the pack: a folder of its own format, a few-block DiT, its
own latent geometry (8 channels, 2x in time, 4x in space, 1x1x1 patches), its own text encoder, tokenizer and VAE.

``tests/test_families.py`` registers it and runs it through the manager, layerwise streaming, the FSDP worker group
and ``VideoGenerator``: no line of the pack's core, weights or distributed code knows it exists. The worker processes
import this file by path (the spec's ``module`` is this module's name).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from video_offload.offload.core.denoise import Conditioning
from video_offload.offload.core.spec import ComponentSpec, LatentSpace, ModelSpec, Role
from video_offload.offload.distributed.fsdp import parallelize
from video_offload.offload.distributed.sampling import sample_in_workers

VOCAB = ["<pad>", *"abcdefghijklmnopqrstuvwxyz ,."]


class ToyTokenizer:
    """Characters to ids; saved as the ``tokenizer.json`` a tokenizer folder must hold."""

    def __init__(self, vocab: list[str] = VOCAB, max_length: int = 16):
        self.vocab, self.max_length = vocab, max_length

    @classmethod
    def from_pretrained(cls, path: str, **_: Any) -> ToyTokenizer:
        return cls(**json.loads((Path(path) / "tokenizer.json").read_text()))

    def save_pretrained(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(json.dumps({"vocab": self.vocab, "max_length": self.max_length}))

    def __call__(self, text: str) -> torch.Tensor:
        ids = [self.vocab.index(c) if c in self.vocab else 0 for c in text.lower()][: self.max_length]
        return torch.tensor([ids + [0] * (self.max_length - len(ids))])


class ToyTextEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.embed(ids)))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, text_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.context = nn.Linear(text_dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("gain", torch.full((dim,), 0.5))  # a persistent buffer inside the block

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(t_emb).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None] + self.context(text.mean(dim=1))[:, None]
        return x + self.gain * self.mlp(h)


class ToyDiT(ModelMixin, ConfigMixin):
    """Tokens are single latent positions (patch 1x1x1)."""

    _repeated_blocks = ["ToyBlock"]
    _no_split_modules = ["ToyBlock"]

    @register_to_config
    def __init__(self, in_channels: int = 8, dim: int = 16, text_dim: int = 8, num_layers: int = 3):
        super().__init__()
        self.patch_in = nn.Linear(in_channels, dim)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU())
        self.layers = nn.ModuleList(ToyBlock(dim, text_dim) for _ in range(num_layers))
        self.patch_out = nn.Linear(dim, in_channels)
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(dim // 2) / (dim // 2))
        self.register_buffer("frequencies", frequencies, persistent=False)  # computed, never stored

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = hidden_states.shape
        x = self.patch_in(hidden_states.flatten(2).transpose(1, 2))
        angles = timestep.float()[:, None] * self.frequencies[None]
        t_emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype))
        for layer in self.layers:
            x = layer(x, t_emb, text.to(x.dtype))
        return self.patch_out(x).transpose(1, 2).reshape(b, c, t, h, w)


class ToyVAE(ModelMixin, ConfigMixin):
    """Latents [1, 8, T, h, w] -> video [1, 3, 2(T-1)+1, 4h, 4w]: a per-position linear map, then upsampling."""

    @register_to_config
    def __init__(self, z_dim: int = 8, temporal: int = 2, spatial: int = 4):
        super().__init__()
        self.to_rgb = nn.Linear(z_dim, 3)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        rgb = self.to_rgb(z.transpose(1, -1)).transpose(1, -1)
        first, rest = rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(self.config.temporal, dim=2)
        video = torch.cat([first, rest], dim=2)
        return torch.tanh(video.repeat_interleave(self.config.spatial, dim=3).repeat_interleave(self.config.spatial, dim=4))


class ToyPredictor:
    def __init__(self, dit, conditioning: Conditioning, device, dtype):
        self.dit, self.dtype = dit, dtype
        self.text = {"cond": conditioning.prompt_embeds.to(device, dtype)}
        if conditioning.negative_prompt_embeds is not None:
            self.text["uncond"] = conditioning.negative_prompt_embeds.to(device, dtype)
        self.has_uncond = "uncond" in self.text

    def __call__(self, latents, timestep, branch):
        return self.dit(latents.to(self.dtype), timestep, self.text[branch]).float()


class ToyStages:
    def latent_space(self, source) -> LatentSpace:
        vae = source.config("vae")
        return LatentSpace(channels=vae["z_dim"], temporal_factor=vae["temporal"], spatial_factor=vae["spatial"],
                           patch=(1, 1, 1), mean=(0.1,) * vae["z_dim"], std=(2.0,) * vae["z_dim"])

    def check_params(self, source, params) -> None:
        pass

    @torch.no_grad()
    def encode_text(self, tokenizer, encoder, text, device) -> torch.Tensor:
        return encoder(tokenizer(text).to(device)).cpu()

    def prepare_image(self, image):
        raise NotImplementedError("the toy family is text-to-video only")

    def encode_image(self, processor, encoder, image, device):
        raise NotImplementedError

    def image_condition(self, vae, image, params, space, device, tiling="off", available_bytes=None):
        raise NotImplementedError

    def noise_predictor(self, dit, conditioning, device, dtype) -> ToyPredictor:
        return ToyPredictor(dit, conditioning, device, dtype)

    def dit_for_step(self, source, dits, timestep, num_train_timesteps, params) -> str:
        return dits[0]

    @torch.no_grad()
    def decode(self, vae, latents, space, device, tiling="off", available_bytes=None) -> torch.Tensor:
        dtype = next(vae.parameters()).dtype
        video = vae.decode(space.to_raw(latents.to(device, dtype)))
        return (video[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu().contiguous()

    def sequence_parallel_heads(self, dit_config) -> None:
        return None  # no Ulysses for the toy: CFG split and FSDP only

    def tokenwise_modules(self, dit) -> list:
        return []

    def chunk_blocks(self, dit, max_tokens) -> bool:
        return False


def parallelize_toy(model, plan, device, *, cpu_offload, pin_memory):
    return parallelize(model, plan, device, cpu_offload=cpu_offload, pin_memory=pin_memory)


def _only(cls):
    return {cls.__name__: lambda: cls}


TOY_T2V = ModelSpec(
    name="toy-t2v",
    family="toy",
    pipeline_class="ToyVideoPipeline",
    components=(
        ComponentSpec("tokenizer", Role.TOKENIZER, _only(ToyTokenizer)),
        ComponentSpec("text_encoder", Role.TEXT_ENCODER, _only(ToyTextEncoder), precision="dit"),
        ComponentSpec("transformer", Role.DIT, _only(ToyDiT), precision="dit"),
        ComponentSpec("vae", Role.VAE, _only(ToyVAE), precision="vae"),
        ComponentSpec("scheduler", Role.SCHEDULER, _only(FlowMatchEulerDiscreteScheduler)),
    ),
    stages=ToyStages(),
    module=__name__,
    parallelize=parallelize_toy,
    worker_methods={"sample": sample_in_workers},
)


def build_toy_folder(path: Path, seed: int = 0) -> Path:
    """Write a toy model folder: ``model_index.json`` plus one subfolder per component, weights in safetensors."""
    torch.manual_seed(seed)
    parts = {
        "tokenizer": ToyTokenizer(),
        "text_encoder": ToyTextEncoder(),
        "transformer": ToyDiT(),
        "vae": ToyVAE(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    index = {"_class_name": "ToyVideoPipeline"}
    for name, part in parts.items():
        if isinstance(part, FlowMatchEulerDiscreteScheduler):
            part.save_config(path / name)
        else:
            part.save_pretrained(path / name)
        index[name] = ["toy_family", type(part).__name__]
    (path / "model_index.json").write_text(json.dumps(index))
    return path
