"""Issue 12: what a ComfyUI user trips over - templates, the start frame, workflow metadata in saved videos,
whole-graph validation, ComfyUI's device choice, node names and descriptions, the demo's leftovers."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

from comfy_executor import REPO_ROOT, WorkflowValidationError, core_nodes, execute, load_pack, make_folder_paths, validate
from helpers import mp4_tags
from test_workflows import SMALL, FakeComfy

WORKFLOWS = REPO_ROOT / "workflows"


@pytest.fixture(scope="module")
def comfy(tiny_t2v, tiny_i2v, tmp_path_factory):  # the Diffusers-folder workflows (single files: test_workflows)
    root = tmp_path_factory.mktemp("comfyui-user")
    models, output, inputs = root / "models" / "diffusers", root / "output", root / "input"
    inputs.mkdir(parents=True)
    shutil.copy(WORKFLOWS / "start_frame.png", inputs / "start_frame.png")  # where the README says it goes
    shutil.copytree(tiny_t2v, models / "Wan2.1-T2V-1.3B-Diffusers")
    shutil.copytree(tiny_i2v, models / "Wan2.1-I2V-14B-480P-Diffusers")
    fake = FakeComfy()
    pack = load_pack(REPO_ROOT, make_folder_paths(models, output, inputs), fake.modules())
    mappings = {**core_nodes(inputs), **pack.NODE_CLASS_MAPPINGS}
    return types.SimpleNamespace(pack=pack, mappings=mappings, output=output, inputs=inputs, fake=fake, root=root)


def api_prompt(name: str) -> dict:
    prompt = json.loads((WORKFLOWS / "api" / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "VideoOffloadSample":
            node["inputs"].update({**SMALL, "steps": 1})
        if node["class_type"] == "VideoOffloadLoadModel":
            node["inputs"]["precision"] = "float32"
    return prompt


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)["inputs"]


# ---------------------------------------------------------------------------------------- 12. templates


def test_only_graph_editor_workflows_are_where_comfyui_lists_templates():
    """ComfyUI lists every workflows/*.json (not subfolders) as a template; the frontend needs the UI format
    (``nodes``, ``links``, ``version``) - an API-format file there opened as an empty canvas."""
    listed = sorted(WORKFLOWS.glob("*.json"))
    assert listed
    for path in listed:
        graph = json.loads(path.read_text())
        assert {"nodes", "links", "version"} <= set(graph), f"{path.name} is not a graph-editor workflow"
    api = sorted((WORKFLOWS / "api").glob("*.json"))
    assert [p.name for p in api] == [p.name for p in listed]
    for path in api:
        assert all("class_type" in node for node in json.loads(path.read_text()).values())


# ---------------------------------------------------------------------------------------- 13. start frame


def test_the_start_frame_is_shipped_small_and_made_by_the_project():
    from make_start_frame import draw  # tests/ is on the path, as for comfy_executor

    shipped = WORKFLOWS / "start_frame.png"
    assert shipped.is_file() and shipped.stat().st_size < 16 * 1024
    with PIL.Image.open(shipped) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    drawn = np.asarray(draw()).astype(np.int16)
    assert pixels.shape == drawn.shape == (480, 832, 3)
    assert (np.abs(pixels - drawn).max(axis=-1) > 24).mean() < 0.01  # the drawing (palette rounding aside)
    image_to_video = sorted(WORKFLOWS.glob("*_i2v_*.json"))  # not TI2V-5B's, which is text-to-video as shipped
    assert image_to_video
    for path in image_to_video:
        text = path.read_text()
        assert '"start_frame.png"' in text, path.name
    readme = (REPO_ROOT / "README.md").read_text()
    assert "workflows/start_frame.png" in readme and "ComfyUI/input/" in readme
    assert "workflows/*.png" in (REPO_ROOT / "pyproject.toml").read_text()


def test_the_i2v_workflow_runs_on_the_shipped_start_frame(comfy):
    prompt = api_prompt("wan2.1_i2v_diffusers_folder.json")
    results = execute(prompt, comfy.mappings)
    decode = next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadDecodeVAE")
    assert results[decode][0].shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)


# ------------------------------------------------------------------------------------ 14. video metadata


def test_a_saved_video_carries_the_prompt_and_workflow_and_starts_with_its_moov(comfy):
    prompt = api_prompt("wan2.1_t2v_diffusers_folder.json")
    graph = json.loads((WORKFLOWS / "wan2.1_t2v_diffusers_folder.json").read_text())
    before = set(comfy.output.rglob("*.mp4"))
    results = execute(prompt, comfy.mappings, extra_pnginfo={"workflow": graph})
    save = next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadSaveVideo")
    saved = results[save]["ui"]["images"][0]
    path = comfy.output / saved["subfolder"] / saved["filename"]
    assert set(comfy.output.rglob("*.mp4")) - before == {path}
    order, tags = mp4_tags(path.read_bytes())
    assert order.index("moov") < order.index("mdat"), order  # the frontend reads only the file's first 64 MiB
    assert json.loads(tags["workflow"]) == graph  # what the frontend loads when the video is dropped on the canvas
    assert json.loads(tags["prompt"]) == prompt


def test_disable_metadata_is_honoured(comfy, monkeypatch):
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=True)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    save = comfy.pack.NODE_CLASS_MAPPINGS["VideoOffloadSaveVideo"]()
    result = save.save(torch.rand(5, 32, 32, 3), 16, "plain/clip", prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    path = comfy.output / "plain" / result["ui"]["images"][0]["filename"]
    _, tags = mp4_tags(path.read_bytes())
    assert "prompt" not in tags and "workflow" not in tags


# --------------------------------------------------------------------------- 15. the whole graph, up front


def test_every_bad_value_of_the_graph_is_reported_before_anything_runs(comfy):
    prompt = api_prompt("wan2.1_t2v_diffusers_folder.json")
    node_of(prompt, "VideoOffloadSample").update(width=100, num_frames=80, cfg=math.nan)
    node_of(prompt, "VideoOffloadSaveVideo")["filename_prefix"] = "../outside"
    node_of(prompt, "VideoOffloadEncodePrompt")["prompt"] = "   "
    registered = len(comfy.pack.nodes._host.shared_manager().models())
    with pytest.raises(WorkflowValidationError) as error:
        execute(prompt, comfy.mappings)
    message = str(error.value)
    for problem in ("width=100: must be a multiple of 16. Fix: use 96 or 112",
                    "num_frames=80: must be of the form 4k+1. Fix: use 77 or 81",
                    "cfg=nan: must be a finite number",
                    "filename_prefix='../outside': leads outside the output folder",
                    "prompt='   ': is empty"):
        assert problem in message, message
    assert len(comfy.pack.nodes._host.shared_manager().models()) == registered, "a node ran before validation ended"


def test_validation_still_checks_bounds_comfyui_skips_for_custom_validated_inputs(comfy):
    prompt = api_prompt("wan2.1_t2v_diffusers_folder.json")
    node_of(prompt, "VideoOffloadSample")["height"] = 9999
    node_of(prompt, "VideoOffloadSaveVideo")["fps"] = 0
    with pytest.raises(WorkflowValidationError, match=r"height=9999: must be from 16 to 8192.*fps=0: must be a whole"):
        validate(prompt, comfy.mappings)


def test_a_valid_graph_passes_validation_with_linked_texts(comfy):
    prompt = api_prompt("wan2.1_t2v_diffusers_folder.json")
    validate(prompt, comfy.mappings)
    assert comfy.pack.NODE_CLASS_MAPPINGS["VideoOffloadEncodePrompt"].VALIDATE_INPUTS(prompt=None, negative_prompt=None)


# -------------------------------------------------------------------------------- 16. ComfyUI's device


def test_inside_comfyui_the_manager_uses_the_device_comfyui_chose(tiny_t2v, tmp_path):
    fake = FakeComfy()
    chosen = torch.device("cpu", 0)  # what get_torch_device() returns under --cpu (an index, to tell it apart)
    fake.model_management.get_torch_device = lambda: chosen
    pack = load_pack(REPO_ROOT, make_folder_paths(tmp_path, tmp_path), fake.modules())
    assert pack.nodes._host.shared_manager().device == chosen


# ------------------------------------------------------------------------------ 17. names, docs, the demo


def test_every_node_is_described_and_save_video_is_told_apart_from_comfyuis():
    from video_offload.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20, name
    assert "VideoOffloadSaveVideo" in NODE_CLASS_MAPPINGS  # the class id saved workflows refer to
    display = NODE_DISPLAY_NAME_MAPPINGS["VideoOffloadSaveVideo"]
    assert display == "Save Video MP4 (Video Offload)"
    assert not display.startswith("Save Video (")
    for path in sorted(WORKFLOWS.rglob("*.json")):
        assert "Save Video (Video Offload)" not in path.read_text(), path.name


def test_the_documented_resident_blocks_bound_is_the_widgets():
    from video_offload.nodes.loaders import offload_widgets

    row = next(line for line in (REPO_ROOT / "docs" / "reliability.md").read_text().splitlines()
               if "| VideoOffloadSettings | resident_blocks |" in line)
    assert f"must be from 0 to {offload_widgets()['resident_blocks'][1]['max']}" in row


def test_the_demo_reuses_one_cached_model_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from video_offload.offload.pipeline import cli

    temp, cache = tmp_path / "tmp", tmp_path / "cache"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    args = ["generate", "--demo", "--no-save", "--height", "32", "--width", "32", "--num-frames", "5",
            "--num-inference-steps", "1", "--precision", "float32"]
    assert cli.main(args) == 0
    first = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    assert cli.main(args) == 0
    assert list(temp.iterdir()) == []
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == first  # the second run reused the first's
    assert (cache / "video-offload" / cli.DEMO_MODEL / "model_index.json").is_file()
