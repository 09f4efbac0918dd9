"""Read a Diffusers-format safetensors folder tensor by tensor, with ``from_pretrained``'s dtype rules.

``WanTransformer3DModel.from_pretrained(folder, dtype=...)`` builds the whole model in host memory and leaves
placement to the caller; a layerwise offloader built on top of it briefly holds two host copies of a 14B DiT (the
loaded one and its arena), or puts the whole model on the GPU. This module lets the offloader do better: it builds
the model with its parameters on the meta device (buffers computed by ``__init__`` on the CPU, exactly as
``from_pretrained`` builds it), and hands out one tensor at a time from the files, cast the way ``from_pretrained``
casts it, to be written straight into its final place (an arena view in host memory, or GPU memory).

The dtype rule is diffusers' (``load_model_dict_into_meta``): with a target dtype, every floating tensor is cast to
it, except those whose name has a component listed in the class's ``_keep_in_fp32_modules`` (Wan: ``rope``,
``time_embedder``, ``scale_shift_table``, ``norm1``, ``norm2``, ``norm3``), which are cast to float32; integer and
bool tensors keep the file's dtype. Without a target dtype every tensor takes the dtype the model was built with.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_HAS_PREADV = hasattr(os, "preadv")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def resolve_model_class(folder: Path, model_cls: type | None) -> type:
    """``model_cls`` itself, or the diffusers class named by ``_class_name`` in the folder's ``config.json``."""
    if model_cls is not None:
        return model_cls
    config_path = folder / "config.json"
    try:
        name = json.loads(config_path.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{config_path}: cannot read the model class name (_class_name). Point at a Diffusers-format model "
            "folder (the one holding config.json and diffusion_pytorch_model*.safetensors), or pass model_cls."
        ) from e
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(
            f"{config_path}: diffusers {diffusers.__version__} has no model class {name!r}. Update diffusers or "
            "pass model_cls."
        )
    return cls


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    # from_pretrained builds the model under torch.set_default_dtype(dtype); buffers computed in __init__ with the
    # default dtype (not Wan's, but other models') must come out the same here.
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_empty_model(model_cls: type, folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model with every parameter on the meta device and every buffer as ``__init__`` computed it, on CPU.

    Uses the same two context managers as diffusers' ``from_pretrained`` (``no_init_weights`` and accelerate's
    ``init_empty_weights``), so a non-persistent buffer such as Wan's rope table is bit-identical to the one a
    ``from_pretrained`` model has. Costs no host memory for the weights.
    """
    try:
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ModelLoadError(
            "Loading a DiT straight into layerwise offload needs the 'accelerate' package (diffusers needs it too, "
            "to load Wan models). Fix: pip install accelerate"
        ) from e
    from diffusers.models.modeling_utils import no_init_weights

    if dtype is not None and not dtype.is_floating_point:
        raise ModelLoadError(f"dtype={dtype}: a model can only be loaded in a floating dtype such as torch.bfloat16")
    try:
        config = model_cls.load_config(str(folder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{folder}: cannot read config.json ({e}). Point at a Diffusers-format model folder."
        ) from e
    with _default_dtype(dtype), no_init_weights(), init_empty_weights(include_buffers=False):
        model = model_cls.from_config(config)
    if hasattr(model, "register_to_config"):
        model.register_to_config(_name_or_path=str(folder))
    return model.eval()


class SafetensorsWeights:
    """The tensors of one Diffusers-format folder (one file or an index of shards), read on demand.

    Use as a context manager; file descriptors stay open while it is. Call :meth:`apply_dtypes` on the empty model
    first, so its meta tensors carry the dtypes the loaded tensors will have; then the offloader calls the object
    as ``weights(name, current, dest)`` (or :meth:`fill_many` for a batch) to fill ``dest``, host or GPU memory.

    Reads go straight from the file into ``dest`` with ``os.preadv`` when no cast is needed and ``dest`` is in host
    memory (one copy, from the page cache or the disk, no intermediate tensor); otherwise through one temporary
    tensor of the file's dtype. The safetensors format is an 8-byte header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw little-endian data.
    """

    def __init__(self, folder: Path, dtype: torch.dtype | None, keep_in_fp32_modules: list[str] | None):
        self.folder = folder
        self.dtype = dtype
        self.keep_in_fp32_modules = list(keep_in_fp32_modules or [])
        self._entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        """name -> (file name, dtype, shape, absolute start offset, byte length)"""
        self._fds: dict[str, int] = {}
        self._to_read: set[str] = set()
        """Names read from the files: the model's persistent tensors (state_dict keys), as from_pretrained reads."""
        self._pool = None
        for file_name in self._file_names(folder):
            self._read_header(file_name)

    @staticmethod
    def _file_names(folder: Path) -> list[str]:
        index_path = folder / WEIGHTS_INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{index_path}: unreadable shard index ({e}). Re-download the model.") from e
            return sorted(set(weight_map.values()))
        if not (folder / WEIGHTS_NAME).is_file():
            raise ModelLoadError(
                f"{folder}: no {WEIGHTS_NAME} and no {WEIGHTS_INDEX_NAME}. Point at the model's transformer folder "
                "of a Diffusers-format download (safetensors weights only)."
            )
        return [WEIGHTS_NAME]

    def _read_header(self, file_name: str) -> None:
        path = self.folder / file_name
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot open ({e}). The shard is missing; re-download the model.") from e
        try:
            with f:
                size = os.fstat(f.fileno()).st_size
                header_len = int.from_bytes(f.read(8), "little")
                if not 0 < header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(f.read(header_len))
            data_start = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name} has dtype {info['dtype']}, which this loader does not read")
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
                    raise ValueError(f"tensor {name}: byte range {begin}..{end} does not match {info}")
                self._entries[name] = (file_name, dtype, shape, data_start + begin, end - begin)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({e}). It is corrupt; re-download it.") from e
        if _HAS_PREADV:
            self._fds[file_name] = os.open(path, os.O_RDONLY)

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the files and the reader threads. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def file_dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def target_dtype(self, name: str, built_dtype: torch.dtype) -> torch.dtype:
        """The dtype ``from_pretrained(dtype=self.dtype)`` gives tensor ``name`` (built as ``built_dtype``)."""
        if self.dtype is None:
            return built_dtype
        file_dtype = self.file_dtype(name)
        if not file_dtype.is_floating_point:
            return file_dtype
        if any(module in name.split(".") for module in self.keep_in_fp32_modules):
            return torch.float32
        return self.dtype

    def apply_dtypes(self, model: nn.Module) -> None:
        """Give every parameter/buffer of ``model`` that is stored in the files its final dtype (on meta) and check
        that every meta tensor is in the files. Raises ModelLoadError listing what is missing or mis-shaped."""
        missing, mismatched = [], []
        persistent = set(model.state_dict(keep_vars=True).keys())
        self._to_read = persistent & set(self._entries)
        for name, tensor, owner, attr, is_param in _named_tensor_slots(model):
            if name not in self._to_read:
                if tensor.is_meta:
                    missing.append(name)
                continue
            shape = self._entries[name][2]
            if shape != tuple(tensor.shape):
                mismatched.append(f"{name}: file {shape}, model {tuple(tensor.shape)}")
                continue
            dtype = self.target_dtype(name, tensor.dtype)
            if tensor.dtype != dtype:
                replacement = torch.empty(tensor.shape, dtype=dtype, device="meta")
                if is_param:
                    owner._parameters[attr] = nn.Parameter(replacement, requires_grad=tensor.requires_grad)
                else:
                    owner._buffers[attr] = replacement
        if missing or mismatched:
            details = "; ".join(
                ([f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else [])
                + ([f"wrong shape: {'; '.join(mismatched[:8])}"] if mismatched else [])
            )
            raise ModelLoadError(
                f"{self.folder}: the weights do not match {type(model).__name__}'s config ({details}). The folder is "
                "incomplete or belongs to another model variant; re-download it or pick the matching folder."
            )
        unexpected = sorted(set(self._entries) - persistent)
        if unexpected:
            logger.debug(
                "%s: ignoring %d tensors the model does not use: %s", self.folder, len(unexpected), unexpected[:8]
            )

    def __call__(self, name: str, current: torch.Tensor, dest: torch.Tensor) -> None:
        """Fill ``dest`` with tensor ``name``: from the files if stored there, else (a non-persistent buffer that
        ``__init__`` computed) from ``current``."""
        if name not in self._to_read:
            if current.is_meta:  # apply_dtypes already refuses this; kept so a direct call cannot leave garbage
                raise ModelLoadError(f"{self.folder}: tensor {name} is not in the files")
            dest.copy_(current)
            return
        file_name, file_dtype, shape, offset, nbytes = self._entries[name]
        if file_dtype == dest.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            self._pread_into(file_name, offset, nbytes, dest)
        else:
            staging = torch.empty(shape, dtype=file_dtype)
            self._pread_into(file_name, offset, nbytes, staging)
            dest.copy_(staging)

    def fill_many(self, items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Fill several tensors concurrently (reads and casts release the GIL; page faults spread over cores)."""
        from concurrent.futures import ThreadPoolExecutor, wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="weights")
        # Largest first, so the long reads start early and the short ones fill the gaps.
        ordered = sorted(items, key=lambda item: -item[2].numel() * item[2].element_size())
        futures = [self._pool.submit(self, *item) for item in ordered]
        wait(futures)  # all of them, even after a failure: no read may still write into memory once we return
        for future in futures:
            future.result()

    def _pread_into(self, file_name: str, offset: int, nbytes: int, dest: torch.Tensor) -> None:
        if nbytes == 0:
            return
        view = memoryview((ctypes.c_char * nbytes).from_address(dest.data_ptr())).cast("B")
        done = 0
        if _HAS_PREADV:  # positional reads: threads share one descriptor per file
            fd = self._fds[file_name]
            while done < nbytes:  # Linux returns at most ~2 GiB per call
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    break
                done += got
        else:  # Windows: a handle per read
            with open(self.folder / file_name, "rb", buffering=0) as f:
                f.seek(offset)
                while done < nbytes:
                    got = f.readinto(view[done:])
                    if not got:
                        break
                    done += got
        if done < nbytes:
            raise ModelLoadError(
                f"{self.folder / file_name}: file ends early ({done} of {nbytes} bytes at offset {offset}). "
                "It is truncated; re-download it."
            )


def _named_tensor_slots(model: nn.Module):
    """(qualified name, tensor, owning module, attribute, is_parameter) for every parameter and buffer, once each."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, tensor in module._parameters.items():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield prefix + attr, tensor, module, attr, True
        for attr, tensor in module._buffers.items():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield prefix + attr, tensor, module, attr, False
