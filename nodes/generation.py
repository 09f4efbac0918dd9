"""Encode Prompt and Sample: text to conditioning, conditioning to denoised latents."""

from __future__ import annotations

from ..offload.config import SAMPLERS, SamplingParams, validate_prompt
from ..offload.errors import ConfigError
from ..offload.pipeline.stages import encode_prompts, sample_latents
from ._host import NodeStepObserver
from .handles import CONDITIONING_TYPE, MODEL_TYPE, ModelHandle
from .latents import to_comfy_latent
from .validation import check_sampling_widgets, problems, report

CATEGORY = "Video Offload"
WIDGET_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg", "guidance_scale_2": "cfg_2"}
"""Engine field -> Sample widget, so an error names the box the user typed into."""


class EncodePrompt:
    """UMT5 embeddings of the prompt and negative prompt (and, for image-to-video, CLIP features of the start
    image), each encoder placed per its offload option."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Model or Offload Settings."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What the video shows."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip":
                    "What to steer away from (used when cfg > 1)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip":
                    "Image-to-video models: the start frame (the first image of the batch is used). Required by I2V "
                    "models, optional for Wan2.2 TI2V-5B (connected: image-to-video; not: text-to-video)."}),
            },
        }

    RETURN_TYPES = (CONDITIONING_TYPE,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encode the prompt and negative prompt (and an image-to-video model's start frame), each encoder placed per its offload option."

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, negative_prompt):
        """Before the graph runs: the texts (linked ones arrive as None and are checked when the node runs)."""
        return report(problems(
            lambda: validate_prompt("prompt", prompt) if prompt is not None else None,
            lambda: validate_prompt("negative_prompt", negative_prompt, allow_empty=True) if negative_prompt is not None else None,
        ))

    def encode(self, model: ModelHandle, prompt: str, negative_prompt: str, image=None):
        start = None if image is None else image[:1]
        return (encode_prompts(model.manager, model.model, model.config, prompt, negative_prompt, start),)


class Sample:
    """Denoise from the seed's noise with the DiT placed per the offload settings."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Model or Offload Settings."}),
                "conditioning": (CONDITIONING_TYPE, {"tooltip": "From Encode Prompt."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 8192, "step": 16, "tooltip":
                    "Pixels, a multiple of 16. 832x480 is Wan's 480p."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 8192, "step": 16, "tooltip":
                    "Pixels, a multiple of 16."}),
                "num_frames": ("INT", {"default": 81, "min": 1, "max": 4093, "step": 4, "tooltip":
                    "4k+1 frames; 81 frames = 5 s at 16 fps. Activation memory and time grow with it."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                    "Guidance scale. Above 1 runs the DiT twice per step (prompt and negative prompt)."}),
                "flow_shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                    "Noise schedule shift. 0 keeps the model's own (its scheduler config: 3.0 in 480p folders, "
                    "5.0 in 720p ones); set 3.0 for 480p or 5.0 for 720p to override."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip":
                    "Initial noise is drawn on the CPU, so a seed gives the same video on any GPU."}),
            },
            "optional": {
                "cfg_2": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                    "Wan2.2 A14B only: guidance of the low-noise expert's steps. 0 uses cfg. As in diffusers, cfg "
                    "alone decides whether the negative prompt runs at all."}),
                "boundary_ratio": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.005, "tooltip":
                    "Wan2.2 A14B only: the high-noise expert runs while the timestep is at least this x 1000, the "
                    "low-noise one after. 0 keeps the model's (0.875 T2V, 0.9 I2V)."}),
                "sampler": (list(SAMPLERS), {"default": "model", "tooltip":
                    "model: the model's own scheduler (UniPC, second order: best at 20-50 steps). euler: first-order "
                    "steps on the same timesteps, what 4-step distilled LoRAs (lightx2v) and ComfyUI's Wan2.2 "
                    "templates use."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents in ComfyUI's own space for this model: native VAE Decode takes them too.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Denoise from the seed's noise, with the DiT streamed, resident or sharded per the offload settings."

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, num_frames, cfg, flow_shift):
        """Before the graph runs, every bad size at once: multiples of 16, 4k+1 frames, bounds, NaN (ComfyUI checks
        steps and seed itself; it skips min/max for the inputs listed here, so the checks include the bounds)."""
        return report(check_sampling_widgets(width=width, height=height, num_frames=num_frames, cfg=cfg,
                                             flow_shift=flow_shift))

    def sample(self, model: ModelHandle, conditioning, width, height, num_frames, steps, cfg, flow_shift, seed,
               cfg_2=None, boundary_ratio=None, sampler="model"):
        try:
            params = SamplingParams(
                height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
                guidance_scale=cfg, flow_shift=None if flow_shift == 0 else flow_shift, seed=seed,
                guidance_scale_2=None if not cfg_2 else cfg_2, boundary_ratio=None if not boundary_ratio else boundary_ratio,
                sampler=sampler,
            )
        except ConfigError as e:
            raise e.renamed(WIDGET_NAMES.get(e.field, e.field)) from None
        latents = sample_latents(model.manager, model.model, model.config, conditioning, params, NodeStepObserver(),
                                 model.lora_patches())
        return (to_comfy_latent(model.model, latents),)
