"""The offload options are declared once (``OffloadConfig``'s fields): every front end offers every one of them, with
the same default, bounds and doc, and one validation serves them all."""

from __future__ import annotations

import dataclasses

import pytest

from video_offload import VideoGenerator
from video_offload.nodes.loaders import OffloadSettings
from video_offload.offload import ConfigError, OffloadConfig, OffloadManager
from video_offload.offload.config import MULTI_GPU_STEPS, SINGLE_GPU_STEPS, option_specs
from video_offload.offload.core.auto_offload import levels_for
from video_offload.offload.core.layerwise import LayerwiseOffloader
from video_offload.offload.pipeline.cli import build_parser

SPECS = option_specs()
SEED_OPTIONS = ("use_fsdp_inference", "dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload",
                "image_encoder_cpu_offload", "vae_cpu_offload", "pin_cpu_memory")


def test_the_declarations_cover_the_config_and_the_seed():
    assert [s.name for s in SPECS] == [f.name for f in dataclasses.fields(OffloadConfig)]
    assert set(SEED_OPTIONS) <= {s.name for s in SPECS}
    assert all(s.doc for s in SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_the_cli_has_the_flag_with_the_default(spec):
    parser = build_parser()
    args = parser.parse_args(["generate", "--demo"])
    assert getattr(args, spec.name) == spec.default
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert spec.flag in help_text


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_the_node_has_the_widget_with_the_tooltip_and_bounds(spec):
    widgets = OffloadSettings.INPUT_TYPES()["required"]
    kind, options = widgets[spec.name]
    assert kind == {"bool": "BOOLEAN", "int": "INT", "choice": list(spec.choices or ())}[spec.kind]
    assert spec.doc in options["tooltip"]
    if spec.kind == "int":
        assert (options["min"], options["max"]) == (spec.low, spec.high)
    if spec.auto:
        assert widgets[f"auto_{spec.name}"][0] == "BOOLEAN"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_from_pretrained_takes_the_option(spec, tiny_t2v):
    if spec.kind == "choice":
        value = next(c for c in spec.choices if c != spec.default)
    else:
        value = {"bool": not spec.default, "int": spec.high}[spec.kind] if spec.name != "num_gpus" else 1
    options = {spec.name: value}
    if spec.name == "use_fsdp_inference":
        options.update(num_gpus=2, dit_layerwise_offload=False)
    generator = VideoGenerator.from_pretrained(tiny_t2v, manager=OffloadManager("cpu"), **options)
    assert getattr(generator.config, spec.name) == value


def test_an_unknown_option_is_refused_by_name(tiny_t2v):
    with pytest.raises(ConfigError, match=r"dit_layerwise_ofload=True: is not an offload option"):
        VideoGenerator.from_pretrained(tiny_t2v, dit_layerwise_ofload=True)


def test_the_auto_ladder_and_the_advice_come_from_the_declared_order():
    names = {s.name for s in SPECS}
    for steps in (SINGLE_GPU_STEPS, MULTI_GPU_STEPS):
        assert {name for step in steps for name in step} <= names
    single = levels_for(OffloadConfig())
    on = [sorted(k for k, v in level.items() if v in (True, "on")) for level in single]
    assert on == [
        [],
        ["dit_layerwise_offload"],
        ["dit_layerwise_offload", "image_encoder_cpu_offload", "vae_cpu_offload"],
        ["dit_activation_chunking", "dit_layerwise_offload", "image_encoder_cpu_offload", "vae_cpu_offload",
         "vae_tiling"],
        ["dit_activation_chunking", "dit_layerwise_offload", "image_encoder_cpu_offload",
         "text_encoder_layerwise_offload", "vae_cpu_offload", "vae_tiling"],
        ["dit_activation_chunking", "dit_layerwise_offload", "image_encoder_cpu_offload", "text_encoder_cpu_offload",
         "text_encoder_layerwise_offload", "vae_cpu_offload", "vae_tiling"],
    ]
    assert single[0]["vae_tiling"] == "auto"  # until a step forces it, tiling decides by free memory
    multi = levels_for(OffloadConfig(num_gpus=2, use_fsdp_inference=True, dit_layerwise_offload=False))
    assert all(level["use_fsdp_inference"] and not level["dit_layerwise_offload"] for level in multi)
    assert [level["dit_cpu_offload"] for level in multi] == [False, False, False, True]


@pytest.mark.parametrize("name, value", [("prefetch_depth", 9), ("prefetch_depth", 0), ("resident_blocks", 1001)])
def test_one_validation_with_one_set_of_bounds(name, value):
    """The config and the layerwise offloader refuse the same values with the same message."""
    from torch import nn

    with pytest.raises(ConfigError) as from_config:
        OffloadConfig(**{name: value})
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(ConfigError) as from_offloader:
        LayerwiseOffloader(model, model[0], "cpu", pin_cpu_memory=False, **{name: value})
    assert str(from_config.value) == str(from_offloader.value)
