"""Issue 12: no lost work - a failed save keeps the frames whatever the error, bad output arguments are refused
before the generation, odd frame sizes save, and no video ever overwrites another."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from video_offload import VideoGenerator
from video_offload.offload import ConfigError, VideoSaveError
from video_offload.offload.pipeline.video_io import save_mp4

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=2)


@pytest.fixture(scope="module")
def generator(tiny_t2v):
    return VideoGenerator.from_pretrained(tiny_t2v, precision="float32")


def frames(count=9, height=64, width=96):
    return np.random.RandomState(0).rand(count, height, width, 3).astype(np.float32)


def video_size(path: Path) -> tuple[int, int]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    return tuple(meta["size"])


# ------------------------------------------------------------------------------------------ 8. failed saves


@pytest.mark.parametrize("case", ["output path is a file", "name too long"])
def test_every_save_failure_is_a_video_save_error_keeping_the_frames(generator, tmp_path, case):
    """Before: the clean-up raised again for anything but ENOENT, so these ended in a raw OSError without frames."""
    pixels = frames()
    if case == "output path is a file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the folder should be")
        target = blocker / "clip.mp4"
    else:
        target = tmp_path / ("x" * 300 + ".mp4")
    with pytest.raises(VideoSaveError, match=r"Saving the video to .* failed .*The frames were generated and are kept"):
        save_mp4(pixels, target)
    assert not any(p.name.endswith(".partial.mp4") for p in tmp_path.rglob("*"))


def test_a_save_failure_after_generating_hands_the_frames_back(generator, tmp_path, monkeypatch):
    from video_offload.offload.pipeline import video_io

    def fail(*args, **kwargs):
        raise OSError(36, "File name too long")

    monkeypatch.setattr(video_io.subprocess, "run", fail)
    with pytest.raises(VideoSaveError, match=r"Fix: use a shorter file name") as error:
        generator.generate_video("a cat", output_path=tmp_path, **SIZES)
    assert error.value.frames.shape == (9, 64, 96, 3)
    assert list(tmp_path.iterdir()) == [], "the reservation or a partial file was left behind"


@pytest.mark.parametrize("output_path, save_video, message", [
    (None, True, r"output_path=None: must be a folder or .mp4 path given as text"),
    (7, True, r"output_path=7: must be a folder or .mp4 path given as text"),
    (b"out/", True, r"output_path=b'out/': must be a folder or .mp4 path given as text"),
    ("out\0dir", True, r"output_path='out\\x00dir': contains a NUL character"),
    ("", True, r"output_path='': is empty"),
    ("FILE/clip.mp4", True, r"leads through .*FILE, which is a file, not a folder"),
    ("x" * 300, True, r"has a name longer than 200 bytes"),
    ("out/", "no", r"save_video='no': must be True or False"),
    ("out/", 1, r"save_video=1: must be True or False"),
])
def test_output_arguments_are_checked_before_any_work(generator, tmp_path, output_path, save_video, message):
    (tmp_path / "FILE").write_text("")
    if isinstance(output_path, str) and output_path.startswith("FILE"):
        output_path = str(tmp_path / output_path)
    components_before = dict(generator.model.components)
    with pytest.raises(ConfigError, match=message):
        generator.generate_video("a cat", output_path=output_path, save_video=save_video, **SIZES)
    assert generator.model.components.keys() == components_before.keys(), "work started before the check"


def test_save_video_false_needs_no_valid_path(generator):
    assert generator.generate_video("a cat", output_path=None, save_video=False, **SIZES).shape == (9, 64, 96, 3)


def test_a_tilde_in_output_path_means_the_home_folder(generator, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    generator.generate_video("a cat", output_path="~/videos", **SIZES)
    assert generator.last_video_path == tmp_path / "videos" / "a_cat_seed0.mp4"
    assert generator.last_video_path.stat().st_size > 1000
    assert not (Path.cwd() / "~").exists()


@pytest.mark.parametrize("height, width", [(63, 95), (64, 95), (63, 96)])
def test_odd_frame_sizes_are_saved_padded_to_even(tmp_path, height, width):
    """libx264's 4:2:0 needs even sizes; before, this failed with advice to free disk space."""
    path = save_mp4(frames(5, height, width), tmp_path / "odd.mp4")
    assert video_size(path) == (width + width % 2, height + height % 2)


# --------------------------------------------------------------------------------------- 9. no overwrites


def test_videos_never_overwrite_each_other(generator, tmp_path):
    long_a = "a" * 60 + " then a cat"
    long_b = "a" * 60 + " then a dog"
    for prompt in (long_a, long_b, "一只猫在花丛中", "кошка в цветах", long_a):
        generator.generate_video(prompt, output_path=tmp_path, **{**SIZES, "num_inference_steps": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 5, names
    assert names[:2] == [f"{'a' * 60}_seed0.mp4", f"{'a' * 60}_seed0_00001.mp4"]


def test_an_explicit_file_name_that_exists_is_kept_and_the_new_video_gets_a_counter(generator, tmp_path):
    target = tmp_path / "mine.mp4"
    target.write_bytes(b"an older video")
    generator.generate_video("a cat", output_path=target, **{**SIZES, "num_inference_steps": 1})
    assert target.read_bytes() == b"an older video"
    assert generator.last_video_path == tmp_path / "mine_00001.mp4"


def test_concurrent_saves_to_one_name_get_distinct_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    pixels = frames(3, 16, 16)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: save_mp4(pixels, tmp_path / "same.mp4"), range(6)))
    assert len(set(paths)) == 6 and all(p.stat().st_size > 0 for p in paths)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
