"""A broken model folder fails before any weight is read, with the file named and the fix given."""

import json
import shutil

import pytest

from video_offload.offload import ModelLoadError
from video_offload.offload.families import open_model


def inspect_model_folder(path):
    return open_model(path)


@pytest.fixture
def model_copy(tiny_t2v, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_t2v, target)
    return target


def test_tiny_folder_is_a_valid_t2v_folder(tiny_t2v):
    folder, spec = inspect_model_folder(tiny_t2v)
    assert folder.pipeline_class == "WanPipeline" and not spec.image_to_video


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist\. Fix: point it at a Diffusers-format Wan2\.1 folder"):
        inspect_model_folder(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no model_index\.json.*Fix:"):
        inspect_model_folder(tmp_path)


def test_missing_component(model_copy):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(ModelLoadError, match=r"incomplete: the 'vae/' folder is missing\. Fix: download it again"):
        inspect_model_folder(model_copy)


def test_pickle_checkpoint_is_refused(model_copy):
    weights = next((model_copy / "transformer").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match=r"\.bin is a pickle checkpoint.*only loads \.safetensors\. Fix:"):
        inspect_model_folder(model_copy)


def test_single_pickle_file_is_refused(tmp_path):
    ckpt = tmp_path / "wan.pt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match=r"wan\.pt is a pickle checkpoint"):
        inspect_model_folder(ckpt)


def test_truncated_safetensors_names_the_file(model_copy):
    weights = next((model_copy / "vae").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=rf"{weights.name} is truncated.*Fix: delete it and download it again"):
        inspect_model_folder(model_copy)


def test_corrupt_safetensors_header_names_the_file(model_copy):
    weights = next((model_copy / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=rf"{weights.name} is not a valid safetensors file"):
        inspect_model_folder(model_copy)


def test_unknown_component_class_is_refused(model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["transformer"] = ["my_package", "EvilTransformer"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"component 'transformer' is a 'EvilTransformer'"):
        inspect_model_folder(model_copy)


def test_missing_shard_of_a_sharded_checkpoint(model_copy):
    folder = model_copy / "transformer"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match=r"incomplete: .*missing shard.*00002-of-00002.*Fix: finish the download"):
        inspect_model_folder(model_copy)
