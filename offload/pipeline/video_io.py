"""Write frames to an .mp4 with the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, VideoSaveError


def frames_to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[F, H, W, 3]`` floats in 0..1 -> uint8, rounding as image libraries do."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError("frames", frames.shape, "must be [frames, height, width, 3]", "pass decoded video frames")
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def validate_fps(fps: object) -> None:
    """Frame rates ffmpeg and players accept; checked before generating so a bad value wastes no work."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 240:
        raise ConfigError("fps", fps, "must be a whole number from 1 to 240", "use 16 (Wan's native rate)")


def save_mp4(frames: np.ndarray | torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Encode ``frames`` to H.264 at ``path`` with imageio-ffmpeg's ffmpeg binary.

    ffmpeg runs as a child whose exit status is checked (a full disk makes it fail, and that must not pass for a
    saved video). It writes to a temporary name that is renamed on success, so a failure never leaves a
    truncated video under the real name.
    """
    validate_fps(fps)
    import imageio_ffmpeg

    pixels = frames_to_uint8(frames)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial.mp4")
    height, width = pixels.shape[1:3]
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-movflags", "+faststart", str(partial),
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, input=pixels.tobytes(), capture_output=True, timeout=600, check=False)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            how = f"was killed by signal {-result.returncode}" if result.returncode < 0 else f"exited with status {result.returncode}"
            raise OSError(f"ffmpeg {how}" + (f": {detail[-1]}" if detail else ""))
        os.replace(partial, path)
    except (OSError, subprocess.SubprocessError) as e:
        partial.unlink(missing_ok=True)
        raise VideoSaveError(
            f"Saving the video to {path} failed ({type(e).__name__}: {e}). The frames were generated and are "
            "kept. Fix: free disk space or choose another output folder, then save again."
        ) from e
    return path
