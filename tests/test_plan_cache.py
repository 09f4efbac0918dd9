"""Planning answers kept on disk between processes (``core/plan_cache.py``): a second process reads what the first
computed, a changed planner or library never reads an old answer, and a cache that cannot be used costs nothing but
the computation."""

from __future__ import annotations

import os
import subprocess
import sys

from video_offload.offload.core.plan_cache import PlanCache, default_cache_dir


def test_a_new_process_reads_the_answer_and_skips_the_computation(tmp_path):
    calls = []

    def replay(key, shape, grid):
        calls.append(grid)
        return (shape[0] * grid[0], shape[1] * grid[1])

    first = PlanCache(tmp_path).memoize("memory", "v1")(replay)
    assert first((type, "cfg"), (3, 5), (1, 2)) == (3, 10)
    assert calls == [(1, 2)]
    # a new PlanCache on the same directory stands for a new process
    second = PlanCache(tmp_path).memoize("memory", "v1")(replay)
    assert second((type, "cfg"), (3, 5), (1, 2)) == (3, 10)  # tuples back, not JSON lists
    assert calls == [(1, 2)]
    assert second((type, "cfg"), (3, 5), (2, 2)) == (6, 10) and calls == [(1, 2), (2, 2)]
    # another version of the planner (or of torch/diffusers) computes again
    changed = PlanCache(tmp_path).memoize("memory", "v2")(replay)
    assert changed((type, "cfg"), (3, 5), (1, 2)) == (3, 10) and len(calls) == 3


def test_a_corrupt_or_unwritable_cache_only_costs_the_computation(tmp_path):
    (tmp_path / "memory-v1.json").write_text("{not json")
    assert PlanCache(tmp_path).memoize("memory", "v1")(lambda x: x + 1)(1) == 2
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert PlanCache(blocked / "below").memoize("memory", "v1")(lambda x: x * 2)(4) == 8


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIDEO_OFFLOAD_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.setenv("VIDEO_OFFLOAD_CACHE_DIR", "off")
    assert default_cache_dir() is None
    calls = []
    cached = PlanCache(None).memoize("memory", "v1")(lambda x: calls.append(x) or x)
    cached(1), cached(1)
    assert calls == [1, 1]
    monkeypatch.delenv("VIDEO_OFFLOAD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "video-offload" / "plans"


SECOND_PROCESS = r"""
import sys, torch
from diffusers import AutoencoderKLWan
from video_offload.offload.families.wan import vae_tiling as tv
with torch.device("meta"):
    vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
peak = tv.estimate_decode_memory(vae, (1, 16, 5, 20, 36), (1, 2)).peak
print(peak, tv._meta_vae.cache_info().misses)  # the replay builds a weightless VAE: 0 means no replay ran
"""


def test_the_vae_planner_answers_a_second_process_from_disk(tmp_path):
    """Two processes estimate the same tiled decode: the second gets the first's number from the cache file."""
    env = dict(os.environ, VIDEO_OFFLOAD_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, second = (r.stdout.split() for r in runs)
    assert first[0] == second[0] and int(first[0]) > 0
    assert (first[1], second[1]) == ("1", "0")  # the first process replayed the decode, the second did not
    assert list(tmp_path.glob("vae-decode-replay-*.json"))
