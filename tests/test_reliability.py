"""Hostile input, faults and soak: the pack refuses cleanly, recovers, and does not leak.

The bad-input cases are the table in docs/reliability.md, parsed and executed here, so the documentation shows
exactly the messages users get.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from comfy_executor import REPO_ROOT, load_pack, make_folder_paths
from helpers import StopAt, rss_bytes
from video_offload import VideoGenerator
from video_offload.offload import OffloadManager, VideoOffloadError

SIZES = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
DOC = REPO_ROOT / "docs" / "reliability.md"


DOCUMENTED_ROWS = 86
"""The hostile-input table's row count: a deleted (or unparseable) row fails here instead of silently not running."""


def doc_cases() -> list[tuple]:
    """Every row of the bad-input table: lines starting with "| <number>". A row whose cells do not parse is an
    error, never skipped."""
    rows = []
    for number, line in enumerate(DOC.read_text().splitlines(), start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0][:1].isdigit():
            assert len(cells) == 6, f"docs/reliability.md line {number}: {len(cells)} cells, expected 6: {line}"
            rows.append(tuple(cells))
    return rows


CASES = doc_cases()


def test_the_table_has_every_documented_row():
    assert len(CASES) == DOCUMENTED_ROWS
    assert len({case[0] for case in CASES}) == len(CASES), "row numbers repeat"


def evaluate(expr: str):
    return eval(expr, {"__builtins__": {}}, {"nan": math.nan, "inf": math.inf, "None": None, "True": True})  # noqa: S307


@pytest.fixture(scope="module")
def node_env(tiny_t2v, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models, output = root / "models", root / "output"
    models.mkdir()
    import shutil

    shutil.copytree(tiny_t2v, models / "tiny")
    (root / "loras").mkdir()  # ComfyUI's models/loras: a sibling of the folder passed as models/diffusers
    from safetensors.torch import save_file

    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(root / "loras" / "not_a_lora.safetensors"))
    pack = load_pack(REPO_ROOT, make_folder_paths(models, output), {})
    nodes = {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    (output / "a_file").parent.mkdir(parents=True, exist_ok=True)
    (output / "a_file").write_text("a file where a filename_prefix expects a folder")
    (model,) = nodes["VideoOffloadLoadModel"].load("tiny", "float32", "float32")
    (conditioning,) = nodes["VideoOffloadEncodePrompt"].encode(model, "a cat", "")
    baseline = {
        "VideoOffloadLoadModel": dict(model_name="tiny", precision="float32", vae_precision="float32"),
        "VideoOffloadSettings": dict(
            model=model, num_gpus=1, use_fsdp_inference=False, dit_cpu_offload=True,
            dit_layerwise_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=True,
            vae_cpu_offload=True, pin_cpu_memory=True, text_encoder_layerwise_offload=False, vae_tiling="auto",
            dit_activation_chunking="auto", prefetch_depth=1, resident_blocks=0, auto_resident_blocks=False,
            auto_offload=False, max_pinned_memory_gb=8, auto_max_pinned_memory_gb=False,
            max_host_memory_gb=16, auto_max_host_memory_gb=False,
        ),
        "VideoOffloadEncodePrompt": dict(model=model, prompt="a cat", negative_prompt=""),
        "VideoOffloadLoadLoRA": dict(model=model, lora_name="not_a_lora.safetensors", strength=1.0, expert="all"),
        "VideoOffloadSample": dict(
            model=model, conditioning=conditioning, width=96, height=64, num_frames=9, steps=2, cfg=5.0,
            flow_shift=3.0, seed=0,
        ),
        "VideoOffloadDecodeVAE": dict(model=model, latent={"samples": torch.zeros(1, 16, 3, 8, 12)}),
        "VideoOffloadSaveVideo": dict(images=torch.zeros(9, 64, 96, 3), fps=16, filename_prefix="ok"),
    }
    return types.SimpleNamespace(pack=pack, nodes=nodes, baseline=baseline, model=model)


def _png(tmp_path, name, size, mode="RGB"):
    import PIL.Image

    path = tmp_path / name
    PIL.Image.new(mode, size).save(path)
    return str(path)


SENTINELS = {
    "IMAGE": lambda tmp_path: torch.rand(1, 32, 48, 3),
    "IMAGE_EMPTY": lambda tmp_path: torch.zeros(0, 64, 96, 3),
    "LATENT4D": lambda tmp_path: {"samples": torch.zeros(1, 16, 4, 4)},
    "LATENT_8CH": lambda tmp_path: {"samples": torch.zeros(1, 8, 3, 8, 12)},
    "LATENT_0F": lambda tmp_path: {"samples": torch.zeros(1, 16, 0, 8, 12)},
    "IMAGE2D": lambda tmp_path: torch.zeros(2, 8, 8),
    "ARRAY_0x0": lambda tmp_path: np.zeros((0, 0, 3), dtype=np.float32),
    "ARRAY_OBJECT": lambda tmp_path: np.empty((8, 8, 3), dtype=object),
    "PNG_1x10000": lambda tmp_path: _png(tmp_path, "strip.png", (10000, 1)),
    "PNG_BOMB": lambda tmp_path: _png(tmp_path, "bomb.png", (20000, 20000), mode="1"),
    "THROUGH_A_FILE": lambda tmp_path: ((tmp_path / "a_file").write_text(""), tmp_path / "a_file" / "clip.mp4")[1],
}
"""Values a table cell cannot spell: each is built (in the test's own folder) when its row runs."""


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}"[:80])
def test_bad_input_is_refused_with_the_documented_message(case, tiny_t2v, tiny_i2v, node_env, tmp_path):
    number, surface, target, field, value_text, excerpt = case
    sentinel = value_text.strip("'")
    value = SENTINELS[sentinel](tmp_path) if sentinel in SENTINELS else evaluate(value_text)
    if surface == "python":
        manager = OffloadManager("cpu")
        if target == "from_pretrained":
            kwargs = {"model_path": tiny_t2v, "manager": manager, field: value}
            with pytest.raises(VideoOffloadError) as info:
                VideoGenerator.from_pretrained(**kwargs)
        else:
            model_path = tiny_i2v if target == "generate_video (i2v)" else tiny_t2v
            generator = VideoGenerator.from_pretrained(model_path, manager=manager, precision="float32")
            kwargs = {"prompt": "a cat", **SIZES, "output_path": tmp_path, field: value}
            if field == "image":
                (tmp_path / "start.png").write_bytes(b"")
            with pytest.raises(VideoOffloadError) as info:
                generator.generate_video(**kwargs)
            assert generator.model.components == {}, "weights were read before the input was checked"
    else:
        node = node_env.nodes[target]
        cls = type(node)
        kwargs = {**node_env.baseline[target], field: value}
        with pytest.raises(Exception) as info:
            getattr(node, cls.FUNCTION)(**kwargs)
        assert isinstance(info.value, node_env.pack.offload.VideoOffloadError), repr(info.value)
    assert excerpt in str(info.value), f"row {number}: {info.value}"
    assert "Traceback" not in str(info.value)


def test_every_node_input_is_covered_by_the_table(node_env):
    """Each widget input of every node has at least one hostile case in docs/reliability.md."""
    covered = {(c[2], c[3]) for c in CASES if c[1] == "node"}
    missing = []
    for name, cls in node_env.pack.NODE_CLASS_MAPPINGS.items():
        for group in cls.INPUT_TYPES().values():
            for input_name, spec in group.items():
                is_widget = isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")
                typed_by_comfyui = isinstance(spec[0], list) or spec[0] == "BOOLEAN"
                if is_widget and not typed_by_comfyui and (name, input_name) not in covered:
                    missing.append(f"{name}.{input_name}")
    allowed = {"VideoOffloadEncodePrompt.negative_prompt"}  # any text is a valid negative prompt
    assert sorted(set(missing) - allowed) == []


def test_long_prompt_is_truncated_with_a_warning(tiny_t2v, caplog):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    caplog.set_level(logging.WARNING)
    frames = generator.generate_video("a cat " * 2000, save_video=False, **SIZES)
    assert frames.shape == (9, 64, 96, 3)
    assert re.search(r"prompt is \d+ tokens; the text encoder reads the first 512", caplog.text)


# ----------------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_interrupt_at_a_random_step_then_a_full_run_is_correct(tiny_t2v, layerwise):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", dit_layerwise_offload=layerwise)
    steps = 4
    reference = generator.generate_video("a cat", seed=1, save_video=False, **{**SIZES, "num_inference_steps": steps})
    rng = random.Random(1234)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            generator.generate_video("a cat", seed=1, save_video=False, observer=StopAt(rng.randrange(steps)),
                                     **{**SIZES, "num_inference_steps": steps})
    again = generator.generate_video("a cat", seed=1, save_video=False, **{**SIZES, "num_inference_steps": steps})
    assert np.array_equal(again, reference)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "resident"])
def test_exception_inside_a_block_leaves_the_pack_working(tiny_t2v, layerwise):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32", dit_layerwise_offload=layerwise)
    reference = generator.generate_video("a cat", seed=2, save_video=False, **SIZES)
    block = generator.model.components["transformer"].blocks[1]

    def explode(module, args):
        raise RuntimeError("a fault inside block 1")

    handle = block.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="a fault inside block 1"):
            generator.generate_video("a cat", seed=2, save_video=False, **SIZES)
    finally:
        handle.remove()
    assert np.array_equal(generator.generate_video("a cat", seed=2, save_video=False, **SIZES), reference)


def test_a_full_disk_when_saving_keeps_the_frames_and_the_next_save_works(tiny_t2v, tmp_path):
    """RLIMIT_FSIZE makes ffmpeg's writes fail like a full disk would; run in a child so the limit stays there."""
    script = f"""
import resource, signal, sys
from pathlib import Path
from video_offload import VideoGenerator
from video_offload.offload import VideoSaveError
from video_offload.offload.pipeline.video_io import save_mp4
generator = VideoGenerator.from_pretrained({str(tiny_t2v)!r}, precision="float32")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
try:
    generator.generate_video("a cat", output_path={str(tmp_path / 'full')!r}, height=64, width=96, num_frames=9,
                             num_inference_steps=2)
except VideoSaveError as e:
    print("ERROR:", e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    path = save_mp4(e.frames, Path({str(tmp_path / 'ok.mp4')!r}))
    print("SAVED", path.stat().st_size, len(list(Path({str(tmp_path / 'full')!r}).glob('*'))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR: Saving the video to" in result.stdout, result.stdout + result.stderr
    assert "The frames were generated and are kept. Fix: free disk space" in result.stdout
    saved = re.search(r"SAVED (\d+) (\d+)", result.stdout)
    assert saved and int(saved.group(1)) > 1000
    assert saved.group(2) == "0", "a partial video was left behind"


# ------------------------------------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_soak_twenty_generations_and_interrupted_runs_do_not_grow_memory(tiny_t2v):
    generator = VideoGenerator.from_pretrained(tiny_t2v, precision="float32")
    prompts = [f"a cat number {i}" for i in range(20)]  # new prompts: the encoder runs every time
    rss = []
    for i, prompt in enumerate(prompts):
        generator.generate_video(prompt, seed=i, save_video=False, **SIZES)
        gc.collect()
        rss.append(rss_bytes())
    assert rss[19] <= rss[1] * 1.02, f"RSS grew from {rss[1]} to {rss[19]}"
    for i in range(5):
        with pytest.raises(KeyboardInterrupt):
            generator.generate_video(f"interrupted {i}", seed=i, save_video=False, observer=StopAt(1), **SIZES)
    generator.generate_video("after the interrupts", save_video=False, **SIZES)
    gc.collect()
    after = rss_bytes()
    assert after <= rss[1] * 1.02, f"RSS grew from {rss[1]} to {after} after interrupted runs"
    print(json.dumps({"rss_after_run_2": rss[1], "rss_after_run_20": rss[19], "rss_after_interrupts": after}))
