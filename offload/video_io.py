"""Write frames to an .mp4 with the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, VideoOffloadError


def frames_to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[F, H, W, 3]`` floats in 0..1 -> uint8, rounding as image libraries do."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError("frames", frames.shape, "must be [frames, height, width, 3]", "pass decoded video frames")
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def save_mp4(frames: np.ndarray | torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Encode ``frames`` to H.264 at ``path``. Written to a temporary name and renamed, so a failure (a full disk,
    say) never leaves a truncated video behind under the real name."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 240:
        raise ConfigError("fps", fps, "must be a whole number from 1 to 240", "use 16 (Wan's native rate)")
    import imageio_ffmpeg

    pixels = frames_to_uint8(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.mp4")
    height, width = pixels.shape[1:3]
    try:
        writer = imageio_ffmpeg.write_frames(
            str(partial), (width, height), fps=fps, codec="libx264", quality=8, macro_block_size=1
        )
        writer.send(None)
        for frame in pixels:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(partial, path)
    except (OSError, RuntimeError, BrokenPipeError) as e:
        partial.unlink(missing_ok=True)
        raise VideoOffloadError(
            f"Saving the video to {path} failed ({type(e).__name__}: {e}). The frames were generated; "
            "fix: free disk space or choose another output folder, then save again."
        ) from e
    return path
