"""The shipped workflows load and run the way ComfyUI would run them, and give diffusers' frames."""

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from comfy_executor import (
    REPO_ROOT,
    WorkflowValidationError,
    comfy_module_name,
    core_nodes,
    execute,
    load_pack,
    make_folder_paths,
    validate,
)

WORKFLOWS = REPO_ROOT / "workflows"
API_FOLDER = WORKFLOWS / "api"
"""API-format twins live in a subfolder: ComfyUI lists every top-level workflows/*.json as a template, and an API
file there opens as an empty canvas."""
API_FILES = sorted(API_FOLDER.glob("wan2.1_*.json"))
"""The Wan2.1 API workflows, which this file runs against diffusers; the Wan2.2 ones run in test_wan22_workflows."""
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SMALL = {"width": 96, "height": 64, "num_frames": 9, "steps": 3}
"""Sample-node sizes for CPU runs; the workflow's own sizes are for a GPU."""


class FakeComfy:
    """``comfy.utils.ProgressBar`` and ``comfy.model_management``'s interrupt flag, recording what the pack does."""

    def __init__(self):
        self.progress: list[tuple[int, int]] = []
        self.interrupt_at_call: int | None = None
        self.calls = 0
        fake = self

        class InterruptProcessingException(Exception):
            pass

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total or self.total))

        def throw_exception_if_processing_interrupted():
            fake.calls += 1
            if fake.interrupt_at_call is not None and fake.calls >= fake.interrupt_at_call:
                fake.interrupt_at_call = None
                raise InterruptProcessingException()

        self.Interrupt = InterruptProcessingException
        self.utils = types.ModuleType("comfy.utils")
        self.utils.ProgressBar = ProgressBar
        self.model_management = types.ModuleType("comfy.model_management")
        self.model_management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        self.model_management.InterruptProcessingException = InterruptProcessingException
        self.package = types.ModuleType("comfy")
        self.package.utils = self.utils
        self.package.model_management = self.model_management

    def modules(self):
        return {"comfy": self.package, "comfy.utils": self.utils, "comfy.model_management": self.model_management}


FILE_LOADERS = {
    "VideoOffloadLoadDiT": ("dit_name", "diffusion_models", "dit"),
    "VideoOffloadLoadTextEncoder": ("text_encoder_name", "text_encoders", "text_encoder"),
    "VideoOffloadLoadVAE": ("vae_name", "vae", "vae"),
    "VideoOffloadLoadCLIPVision": ("clip_name", "clip_vision", "image_encoder"),
}
"""Single-file loader -> (widget, ComfyUI model folder, component)."""


def kind_of(prompt: dict) -> str:
    return "i2v" if any("image" in n["inputs"] for n in prompt.values() if n["class_type"] == "VideoOffloadEncodePrompt") else "t2v"


@pytest.fixture(scope="module")
def comfy_env(tiny_t2v, tiny_i2v, single_files, start_image, tmp_path_factory):
    """The pack loaded from its folder under a ComfyUI-style name, with models, input and output folders of its
    own. Each model a workflow names is a tiny model of the same kind (I2V names get the tiny I2V model); each
    single file it names (Comfy-Org's names) is a tiny Comfy-Org-style file of that kind, in the fp8_scaled layout
    those names say, placed in ComfyUI's folder for it."""
    root = tmp_path_factory.mktemp("comfyui")
    models, output, inputs = root / "models" / "diffusers", root / "output", root / "input"
    inputs.mkdir(parents=True)
    start_image.save(inputs / "start_frame.png")
    for api_file in API_FILES:
        prompt = json.loads(api_file.read_text())
        for node in prompt.values():
            if node["class_type"] == "VideoOffloadLoadModel":
                name = node["inputs"]["model_name"]
                target = models / name
                if not target.exists():
                    shutil.copytree(tiny_i2v if "I2V" in name else tiny_t2v, target)
            if node["class_type"] in FILE_LOADERS:
                widget, folder, component = FILE_LOADERS[node["class_type"]]
                target = models.parent / folder / node["inputs"][widget]
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copyfile(single_files[(kind_of(prompt), "fp8_scaled")][component], target)
    fake = FakeComfy()
    pack = load_pack(REPO_ROOT, make_folder_paths(models, output, inputs), fake.modules())
    mappings = {**core_nodes(inputs), **pack.NODE_CLASS_MAPPINGS}
    return types.SimpleNamespace(pack=pack, mappings=mappings, models=models, output=output, inputs=inputs, fake=fake)


def small(prompt: dict) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] == "VideoOffloadSample":
            node["inputs"].update(SMALL)
        if node["class_type"] in ("VideoOffloadLoadModel", "VideoOffloadWanModel"):
            node["inputs"]["precision"] = "float32"
    return prompt


def diffusers_frames(folder, image, prompt, negative_prompt, seed, **sizes):
    """diffusers' own pipeline on a folder (the oracle), as the conftest references run it."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if image is None:
        pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
        args = (prompt,)
    else:
        pipe = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
        args = (image, prompt)
    pipe.set_progress_bar_config(disable=True)
    return pipe(*args, negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np", **sizes).frames[0]


def widget_names(cls) -> list[str]:
    """The widgets the graph editor shows for a node, in order, with the seed's control widget after it."""
    names = []
    inputs = cls.INPUT_TYPES()
    # Optional inputs of a widget kind are widgets too, after the required ones, and a saved graph holds their values.
    for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
        if isinstance(spec[0], list) or spec[0] in WIDGET_KINDS:
            names.append(name)
            options = spec[1] if len(spec) > 1 else {}
            if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
                names.append(f"{name}:control_after_generate")
            if options.get("image_upload"):
                names.append(f"{name}:upload")
    return names


def ui_to_api(ui: dict, mappings: dict) -> dict:
    """What the graph editor sends to POST /prompt for a saved graph."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        cls = mappings[node["type"]]
        inputs = {}
        values = iter(node["widgets_values"])
        for name in widget_names(cls):
            value = next(values)
            if ":" not in name:  # control and upload widgets are not serialised into the API prompt
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_there_are_workflows():
    assert API_FILES and UI_FILES


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_nodes_exist_with_the_right_widgets(comfy_env, ui_file):
    mappings = comfy_env.mappings
    ui = json.loads(ui_file.read_text())
    for node in ui["nodes"]:
        assert node["type"] in mappings, f"{ui_file.name}: unknown node type {node['type']}"
        expected = widget_names(mappings[node["type"]])
        assert len(node["widgets_values"]) == len(expected), (node["type"], expected, node["widgets_values"])


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.name)
def test_ui_and_api_workflows_are_the_same_graph(comfy_env, ui_file):
    api_file = API_FOLDER / ui_file.name
    assert api_file.is_file(), f"{ui_file.name} has no API-format twin"
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in json.loads(api_file.read_text()).items()}
    assert ui_to_api(json.loads(ui_file.read_text()), comfy_env.mappings) == api


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.name)
def test_api_workflow_runs_and_matches_diffusers(
    comfy_env, api_file, diffusers_t2v_reference, diffusers_i2v_reference, start_image, single_file_references
):
    prompt = small(json.loads(api_file.read_text()))
    comfy_env.fake.progress.clear()
    results = execute(prompt, comfy_env.mappings)
    decode_id = next(k for k, v in prompt.items() if v["class_type"] == "VideoOffloadDecodeVAE")
    frames = results[decode_id][0]
    assert isinstance(frames, torch.Tensor) and frames.dtype == torch.float32
    encode = next(v for v in prompt.values() if v["class_type"] == "VideoOffloadEncodePrompt")["inputs"]
    sample = next(v for v in prompt.values() if v["class_type"] == "VideoOffloadSample")["inputs"]
    sizes = dict(
        height=sample["height"], width=sample["width"], num_frames=sample["num_frames"],
        num_inference_steps=sample["steps"], guidance_scale=sample["cfg"],
    )
    assert sample["flow_shift"] == 0.0  # the shipped workflows keep the model folder's own shift, as diffusers does
    if any(v["class_type"] == "VideoOffloadWanModel" for v in prompt.values()):
        # Single files: diffusers on a folder holding the numbers the fp8 files hold (ComfyUI's dequantisation).
        folder = single_file_references[(kind_of(prompt), "fp8_scaled")]
        image = start_image if "image" in encode else None
        reference = diffusers_frames(folder, image, encode["prompt"], encode["negative_prompt"], sample["seed"], **sizes)
    elif "image" in encode:
        reference = diffusers_i2v_reference(start_image, encode["prompt"], encode["negative_prompt"], sample["seed"], **sizes)
    else:
        folder_shift = json.loads((comfy_env.models / "Wan2.1-T2V-1.3B-Diffusers" / "scheduler" / "scheduler_config.json")
                                  .read_text())["flow_shift"]
        reference = diffusers_t2v_reference(
            encode["prompt"], encode["negative_prompt"], sample["seed"], flow_shift=folder_shift, **sizes
        )
    assert np.abs(frames.numpy() - reference).max() <= 1e-4
    assert comfy_env.fake.progress[-1] == (SMALL["steps"], SMALL["steps"])
    saved = [p for p in comfy_env.output.rglob("*.mp4")]
    assert saved, "Save Video wrote nothing"


def test_interrupt_stops_between_steps_and_the_next_run_works(comfy_env):
    prompt = small(json.loads(API_FILES[0].read_text()))
    comfy_env.fake.calls = 0
    comfy_env.fake.interrupt_at_call = 2  # before the second denoising step
    comfy_env.fake.progress.clear()
    with pytest.raises(comfy_env.fake.Interrupt):
        execute(prompt, comfy_env.mappings)
    assert comfy_env.fake.progress == [(1, SMALL["steps"])]
    results = execute(prompt, comfy_env.mappings)
    assert any(isinstance(r, tuple) and r and isinstance(r[0], torch.Tensor) for r in results.values())


@pytest.mark.parametrize(
    "node_class, field, value, message",
    [
        ("VideoOffloadSample", "steps", 5000, "above the maximum"),
        # Inputs a node's VALIDATE_INPUTS takes skip ComfyUI's min/max; the node's own check reports them.
        ("VideoOffloadSample", "num_frames", 5000, r"num_frames=5000: must be from 1 to 4093"),
        ("VideoOffloadSample", "cfg", "high", "is not a FLOAT"),
        ("VideoOffloadSample", "seed", True, "is not an INT"),
        ("VideoOffloadLoadModel", "precision", "int4", "not in choices"),
        ("VideoOffloadSettings", "pin_cpu_memory", 1, "is not a BOOLEAN"),
    ],
)
def test_executor_rejects_what_comfyui_rejects(comfy_env, node_class, field, value, message):
    prompt = small(json.loads(API_FILES[0].read_text()))
    next(v for v in prompt.values() if v["class_type"] == node_class)["inputs"][field] = value
    with pytest.raises(WorkflowValidationError, match=message):
        validate(prompt, comfy_env.mappings)


def test_model_names_cannot_escape_the_model_folders(comfy_env, tmp_path):
    ModelLoadError = comfy_env.pack.offload.ModelLoadError  # the class as the ComfyUI-loaded copy defines it
    load = comfy_env.mappings["VideoOffloadLoadModel"]()
    for name in ("../secrets", str(tmp_path), "/etc"):
        with pytest.raises(ModelLoadError, match="outside ComfyUI's diffusers model folders"):
            load.load(name, "auto", "float32")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (comfy_env.models / "sneaky").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="is a link to .*outside ComfyUI's diffusers model folders"):
        load.load("sneaky", "auto", "float32")


def test_every_input_has_a_tooltip(comfy_env):
    for name, cls in comfy_env.pack.NODE_CLASS_MAPPINGS.items():
        for kind, group in cls.INPUT_TYPES().items():
            if kind == "hidden":  # filled by ComfyUI (the prompt, the workflow), never shown
                continue
            for input_name, spec in group.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_pack_works_from_any_folder_name(tmp_path, comfy_env):
    """ComfyUI names the module after the folder's path; the pack must not assume its own name."""
    copy = tmp_path / "Some Pack-Name.v2"
    shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "tests"))
    pack = load_pack(copy, make_folder_paths(comfy_env.models, comfy_env.output), {})
    assert set(pack.NODE_CLASS_MAPPINGS) == set(comfy_env.pack.NODE_CLASS_MAPPINGS)
    assert sys.modules[comfy_module_name(copy)] is pack


def test_file_loaders_list_comfyui_folders_like_its_own_loaders(comfy_env, single_files, tiny_t2v):
    """Files of ComfyUI's folders (legacy ``unet``/``clip`` too, subfolders included, pickles not offered), then
    the Diffusers folders - including ``Wan-AI/<repo>`` and the Hugging Face cache layout, under the repo name."""
    models = comfy_env.models.parent
    (models / "unet" / "old").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(single_files[("t2v", "bf16")]["dit"], models / "unet" / "old" / "legacy_dit.safetensors")
    (models / "clip").mkdir(exist_ok=True)
    shutil.copyfile(single_files[("t2v", "bf16")]["text_encoder"], models / "clip" / "umt5_legacy.safetensors")
    (models / "clip" / "not_offered.pt").write_bytes(b"pickle")
    shutil.copytree(tiny_t2v, comfy_env.models / "Wan-AI" / "Wan2.1-T2V-Org-Diffusers", dirs_exist_ok=True)
    cache = comfy_env.models / "models--Wan-AI--Wan2.1-T2V-Cached-Diffusers"
    shutil.copytree(tiny_t2v, cache / "snapshots" / "abc123", dirs_exist_ok=True)

    dit_choices = comfy_env.mappings["VideoOffloadLoadDiT"].INPUT_TYPES()["required"]["dit_name"][0]
    assert "wan2.1_t2v_14B_fp8_scaled.safetensors" in dit_choices and "old/legacy_dit.safetensors" in dit_choices
    text_choices = comfy_env.mappings["VideoOffloadLoadTextEncoder"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert "umt5_legacy.safetensors" in text_choices and "not_offered.pt" not in text_choices
    folders = comfy_env.mappings["VideoOffloadLoadModel"].INPUT_TYPES()["required"]["model_name"][0]
    assert {"Wan2.1-T2V-Org-Diffusers", "Wan-AI/Wan2.1-T2V-Org-Diffusers", "Wan2.1-T2V-Cached-Diffusers"} <= set(folders)
    assert "[Diffusers folder] Wan2.1-T2V-Cached-Diffusers" in text_choices

    load = comfy_env.mappings["VideoOffloadLoadModel"]()
    for name in ("Wan2.1-T2V-Org-Diffusers", "Wan2.1-T2V-Cached-Diffusers"):
        handle = load.load(name, "float32", "float32")[0]
        assert handle.model.spec.name == "wan2.1-t2v"
    assert load.load("Wan2.1-T2V-Cached-Diffusers", "float32", "float32")[0].model.source.path.name == "abc123"

    # A model from the legacy folders, its text encoder from a Diffusers folder picked in the same list.
    dit = comfy_env.mappings["VideoOffloadLoadDiT"]().load(dit_name="old/legacy_dit.safetensors")[0]
    text = comfy_env.mappings["VideoOffloadLoadTextEncoder"]().load(
        text_encoder_name="[Diffusers folder] Wan2.1-T2V-Cached-Diffusers")[0]
    vae = comfy_env.mappings["VideoOffloadLoadVAE"]().load(vae_name="wan_2.1_vae.safetensors")[0]
    handle = comfy_env.mappings["VideoOffloadWanModel"]().assemble(dit, text, vae, "float32", "float32")[0]
    parts = handle.model.source.parts
    assert type(parts["transformer"]).__name__ == "FilePart" and parts["transformer"].path.parent.name == "old"
    assert type(parts["text_encoder"]).__name__ == type(parts["tokenizer"]).__name__ == "FolderPart"
    assert parts["text_encoder"].folder.path.name == "abc123"


def test_file_loaders_refuse_names_outside_their_folders_and_wrong_files(comfy_env):
    ModelLoadError = comfy_env.pack.offload.ModelLoadError
    loader = comfy_env.mappings["VideoOffloadLoadDiT"]()
    for name in ("../diffusers/anything.safetensors", "/etc/passwd", "missing.safetensors"):
        with pytest.raises(ModelLoadError, match=r"dit_name=.* was not found in ComfyUI's diffusion_models folders"):
            loader.load(dit_name=name)
    with pytest.raises(ModelLoadError, match=r"dit_name='' is empty"):
        loader.load(dit_name="")
    wrong = comfy_env.mappings["VideoOffloadLoadVAE"]().load(vae_name="wan_2.1_vae.safetensors")[0]
    dit = type(wrong)("dit", wrong.path)  # a VAE file wired as the DiT
    text = comfy_env.mappings["VideoOffloadLoadTextEncoder"]().load(
        text_encoder_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    with pytest.raises(ModelLoadError, match=r"wan_2\.1_vae\.safetensors is not a DiT this pack runs \(it is a Wan VAE"):
        comfy_env.mappings["VideoOffloadWanModel"]().assemble(dit, text, wrong, "auto", "float32")


def test_the_tiny_comfyui_files_have_the_names_the_workflows_use():
    """``python -m video_offload.offload.families.wan.comfy_export ComfyUI/models`` writes tiny files for a real
    ComfyUI run of the shipped workflows: under exactly the names and folders those workflows pick."""
    from video_offload.offload.families.wan.comfy_export import COMFY_FOLDERS, COMFY_ORG_NAMES

    written = {(COMFY_FOLDERS[argument], name) for (argument, _), name in COMFY_ORG_NAMES.items()}
    used = set()
    for api_file in API_FILES:
        for node in json.loads(api_file.read_text()).values():
            if node["class_type"] in FILE_LOADERS:
                widget, folder, _ = FILE_LOADERS[node["class_type"]]
                used.add((folder, node["inputs"][widget]))
    assert used and used == written
