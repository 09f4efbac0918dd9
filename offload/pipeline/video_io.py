"""Write frames to an .mp4 with the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed).

A saved video never replaces another one: names are reserved with an exclusive create (a counter is appended
when the name is taken), the video is written under a hidden temporary name and renamed over its reservation,
so a failure never leaves a truncated .mp4 and two runs never share a file. Any failure is a ``VideoSaveError``
(callers attach the frames to it, so the work is not lost). The moov atom comes first (``faststart``) and
optional metadata - ComfyUI's ``prompt`` and ``workflow`` JSON - is written as ComfyUI writes it, so a video
dropped on ComfyUI's canvas restores its graph.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, VideoSaveError

logger = logging.getLogger(__name__)

MAX_COUNTER = 99_999


def frames_to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[F, H, W, 3]`` floats in 0..1 -> uint8, rounding as image libraries do (one float working copy)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError("frames", frames.shape, "must be [frames, height, width, 3]", "pass decoded video frames")
    work = np.clip(frames, 0.0, 1.0, dtype=np.float32)
    work *= 255.0
    np.rint(work, out=work)
    return work.astype(np.uint8)


def validate_fps(fps: object) -> int:
    """Frame rates ffmpeg and players accept; checked before generating so a bad value wastes no work."""
    if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= 240:
        raise ConfigError("fps", fps, "must be a whole number from 1 to 240", "use 16 (Wan's native rate)")
    return int(fps)


def _advice(error: BaseException) -> str:
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "free disk space or choose another output folder"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose an output folder you can write to"
    if code == errno.ENAMETOOLONG:
        return "use a shorter file name or prefix"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "a file is in the way of the output folder: choose another output folder or name"
    return "free disk space or choose another output folder"


def _unlink_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except OSError:
        pass  # clean-up must never replace the error being reported


def reserve_path(path: Path, numbered: bool = False) -> Path:
    """Create ``path`` as an empty file that no one else can take, and return it; if it exists, the first free
    ``<stem>_<NNNNN><suffix>`` after the highest number in use. ``numbered``: always add the number (ComfyUI's
    naming: ``prefix_00001.mp4``)."""
    folder, stem, suffix = path.parent, path.stem, path.suffix
    candidates = [] if numbered else [path]
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})" + re.escape(suffix) + "$")
    highest = max((int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m), default=0)
    candidates += [folder / f"{stem}_{counter:05d}{suffix}" for counter in range(highest + 1, MAX_COUNTER + 1)]
    for candidate in candidates:
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return candidate
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"every name {stem}_NNNNN{suffix} up to {MAX_COUNTER} is taken in {folder}")


def _metadata_file(path: Path, metadata: dict[str, str]) -> None:
    """ffmpeg's ffmetadata format; ``=``, ``;``, ``#``, ``\\`` and newlines escaped with a backslash."""
    def escape(text: str) -> str:
        return re.sub(r"([=;#\\\n])", r"\\\1", text)

    lines = [";FFMETADATA1"] + [f"{escape(key)}={escape(value)}" for key, value in metadata.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_mp4(
    frames: np.ndarray | torch.Tensor, path: str | Path, fps: int = 16, metadata: dict[str, str] | None = None,
    numbered: bool = False,
) -> Path:
    """Encode ``frames`` to H.264 in a new file at ``path`` (see :func:`reserve_path`: never over an existing one)
    and return the path written.

    ffmpeg runs as a child whose exit status is checked (a full disk makes it fail, and that must not pass for a
    saved video). Odd frame sizes are padded by one pixel (libx264's 4:2:0 needs even ones). ``metadata``: text
    values stored as mp4 tags (``-movflags use_metadata_tags``, as ComfyUI's SaveVideo stores ``prompt`` and
    ``workflow``).
    """
    fps = validate_fps(fps)
    import imageio_ffmpeg

    pixels = frames_to_uint8(frames)
    path = Path(path)
    reserved: Path | None = None
    partial: Path | None = None
    tags: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        reserved = reserve_path(path, numbered)
        partial = reserved.with_name(f".{reserved.name}.partial.mp4")
        height, width = pixels.shape[1:3]
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        ]
        if metadata:
            tags = reserved.with_name(f".{reserved.name}.tags.txt")
            _metadata_file(tags, metadata)
            command += ["-f", "ffmetadata", "-i", str(tags), "-map", "0:v", "-map_metadata", "1"]
        if height % 2 or width % 2:
            logger.info("padding %dx%d frames to even dimensions for H.264", width, height)
            command += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        command += ["-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17",
                    "-movflags", "+faststart+use_metadata_tags", "-f", "mp4", str(partial)]
        result = subprocess.run(command, input=pixels.tobytes(), capture_output=True, timeout=600, check=False)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            how = f"was killed by signal {-result.returncode}" if result.returncode < 0 else f"exited with status {result.returncode}"
            raise OSError(f"ffmpeg {how}" + (f": {detail[-1][:300]}" if detail else ""))
        os.replace(partial, reserved)
        partial = None
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        _unlink_quietly(partial)
        _unlink_quietly(reserved)
        where = reserved or path
        raise VideoSaveError(
            f"Saving the video to {where} failed ({type(e).__name__}: {str(e)[:400]}). The frames were generated and "
            f"are kept. Fix: {_advice(e)}, then save again."
        ) from e
    finally:
        _unlink_quietly(tags)
    return reserved
