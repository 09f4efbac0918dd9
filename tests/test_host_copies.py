"""core.host_copies: device tensors written into regions of host tensors, and host regions sent to the device,
without the synchronous copies PyTorch makes for strided host memory.

On the CPU the writer is a plain copy (what lands where is checked); on a GPU (marked, run on the device) the
writes into strided host regions land exactly, and a write returns while the device is still busy: the host is not
made to wait for the device.
"""

from __future__ import annotations

import time

import pytest
import torch

from video_offload.offload.core.host_copies import HostWriter, to_device


def _regions(out: torch.Tensor):
    """Column bands of every other frame: strided regions of a [F, H, W, C] host tensor, as a tiled decode writes."""
    f, h, w, _ = out.shape
    for t in range(0, f, 2):
        for c0, c1 in ((0, w // 3), (w // 3, w)):
            yield out[t : t + 2, :, c0:c1]


def _write_all(out: torch.Tensor, device: torch.device, depth: int = 2) -> torch.Tensor:
    expected = torch.zeros_like(out)
    writer = HostWriter(depth=depth)
    for i, (dst, ref) in enumerate(zip(_regions(out), _regions(expected))):
        src = torch.arange(dst.numel(), dtype=torch.float32).reshape(dst.shape) + 1000 * i
        ref.copy_(src)
        writer.write(dst, src.to(device))
    writer.finish(device)
    return expected


def test_writes_land_in_their_regions_on_the_cpu():
    out = torch.zeros(6, 5, 9, 3)
    expected = _write_all(out, torch.device("cpu"))
    assert torch.equal(out, expected)
    assert out.count_nonzero() > out.numel() // 2  # every region was written, not only the first


def test_to_device_on_the_cpu_is_the_tensor():
    """Computing on the CPU nothing is staged or copied: the region itself is what the pass reads."""
    x = torch.randn(2, 3, 4)[:, :, 1:3]
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 3])
def test_staged_writes_land_exactly_on_a_gpu(depth):
    device = torch.device("cuda")
    out = torch.zeros(8, 16, 24, 3)
    expected = _write_all(out, device, depth)
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_a_write_does_not_wait_for_the_device():
    """A write into a strided host region queued behind a long kernel returns at once; the region is filled once
    finish() returns. A plain ``copy_`` into the same region waits for the kernel."""
    device = torch.device("cuda")
    out = torch.zeros(4, 64, 96, 3)
    dst = out[:, :, 10:50]
    src = torch.randn(dst.shape, device=device)
    torch.cuda.synchronize()
    cycles = 2_000_000_000  # about a second on a datacenter GPU

    writer = HostWriter()
    torch.cuda._sleep(cycles)
    started = time.perf_counter()
    writer.write(dst, src)
    returned = time.perf_counter() - started
    writer.finish(device)
    waited = time.perf_counter() - started
    assert torch.equal(dst, src.cpu())

    torch.cuda._sleep(cycles)
    started = time.perf_counter()
    dst.copy_(src * 2, non_blocking=True)
    plain = time.perf_counter() - started
    assert torch.equal(dst, (src * 2).cpu())
    assert returned < 0.05 < waited / 4, (returned, waited)
    assert plain > waited / 4, (plain, waited)  # what the writer avoids: PyTorch's strided copy waits


@pytest.mark.gpu
def test_to_device_from_a_strided_host_region():
    device = torch.device("cuda")
    video = torch.randn(1, 3, 9, 32, 48)
    part = video[:, :, 1:5, 4:20, 8:40]
    moved = to_device(part, device)
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), part)
