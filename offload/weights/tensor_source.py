"""Weights read tensor by tensor, cast the way ``from_pretrained`` casts them, written straight to their final place.

``WanTransformer3DModel.from_pretrained(folder, dtype=...)`` builds the whole model in host memory and leaves
placement to the caller; a layerwise offloader built on top of it briefly holds two host copies of a 14B DiT (the
loaded one and its arena), or puts the whole model on the GPU. This module lets an offloader (or an FSDP rank) do
better: :func:`build_empty_model` builds the model with its parameters on the meta device (buffers computed by
``__init__`` on the CPU, exactly as ``from_pretrained`` builds it), and :class:`SafetensorsWeights` hands out one
tensor at a time from the files, to be written into an arena view in host memory, GPU memory, or a shard.

The dtype rule is diffusers' (``load_model_dict_into_meta``): with a target dtype, every floating tensor is cast to
it, except those whose name has a component listed in the class's ``_keep_in_fp32_modules`` (Wan: ``rope``,
``time_embedder``, ``scale_shift_table``, ``norm1``, ``norm2``, ``norm3``), which are cast to float32; integer and
bool tensors keep the file's dtype. Without a target dtype every tensor takes the dtype the model was built with.

Narrow stored tensors (fp8 single files, ``stored_format``) follow the same rule for their compute dtype; wherever
they are filled into memory of that dtype they are widened with ComfyUI's rule (``stored_format.dequantize``:
cast, then times the per-tensor scale), and a layerwise offloader may instead ask for their stored bytes
(:meth:`SafetensorsWeights.stored_format`) to keep them narrow in host memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..core.stored_format import NARROW_FLOATS, StoredFormat, dequantize
from ..core.tensors import materialize, tensor_refs
from ..errors import ModelLoadError
from .files import read_text
from .safetensors_file import SafetensorsFile, TensorEntry

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def folder_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names (refusing a missing one), or its files.

    The one reader of shard indexes (``*.safetensors.index.json``, diffusers' and transformers' alike). Pickle
    checkpoints are refused by name: loading them can run code.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        names: set[str] = set()
        for index_path in indexes:
            try:
                weight_map = json.loads(read_text(index_path, "shard index"))["weight_map"]
                names |= set(weight_map.values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise ModelLoadError(f"{index_path} is not a valid shard index ({str(e)[:200]}). Fix: re-download it.") from e
        bad = sorted(str(n)[:100] for n in names if not isinstance(n, str) or Path(n).name != n)
        if bad:
            raise ModelLoadError(f"{indexes[0]}: shard names must be plain file names, got {bad[0]!r}. Fix: re-download it.")
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise ModelLoadError(
                f"{folder} is incomplete: {indexes[0].name} lists {len(missing)} missing shard(s), first "
                f"{missing[0][:100]}. Fix: finish the download."
            )
        return [folder / name for name in sorted(names)]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise ModelLoadError(pickle_message(pickles[0]))
        raise ModelLoadError(
            f"{folder} has no .safetensors weights (no {WEIGHTS_NAME} and no shard index). Fix: download the "
            f"safetensors files of '{folder.name}' (safetensors weights only)."
        )
    return files


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Checkpoint formats that unpickle Python objects when loaded, and so can run code: always refused."""


def pickle_message(file: Path) -> str:
    return (
        f"{file} is a pickle checkpoint ({file.suffix}). Loading pickles can run arbitrary code, so this pack "
        "only loads .safetensors. Fix: download the safetensors version of the model (the official "
        "*-Diffusers folders ship safetensors)."
    )


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


def build_empty_model(model_cls: type, config: dict, dtype: torch.dtype | None, name_or_path: str = "") -> nn.Module:
    """``model_cls`` with every parameter on the meta device and every buffer as ``__init__`` computed it, on CPU.

    Uses the same two context managers as diffusers' ``from_pretrained`` (``no_init_weights`` and accelerate's
    ``init_empty_weights``), so a non-persistent buffer such as Wan's rope table is bit-identical to the one a
    ``from_pretrained`` model has. Costs no host memory for the weights. Diffusers classes are built with
    ``from_config(config)``; transformers classes from their ``config_class(**config)``, with shared weights tied
    (UMT5's embedding) as their ``from_pretrained`` ties them.
    """
    try:
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ModelLoadError(
            "Loading a model straight into offloaded memory needs the 'accelerate' package (diffusers needs it too). "
            "Fix: pip install accelerate"
        ) from e
    from diffusers.models.modeling_utils import no_init_weights

    if dtype is not None and not dtype.is_floating_point:
        raise ModelLoadError(f"dtype={dtype}: a model can only be loaded in a floating dtype such as torch.bfloat16")
    with _default_dtype(dtype), no_init_weights(), init_empty_weights(include_buffers=False):
        if hasattr(model_cls, "from_config"):
            model = model_cls.from_config(config)
        else:
            model = model_cls(model_cls.config_class(**config))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if name_or_path and hasattr(model, "register_to_config"):
        model.register_to_config(_name_or_path=name_or_path)
    return model.eval()


def keep_in_fp32_modules(model_cls: type, dtype: torch.dtype | None) -> list[str]:
    """The modules ``model_cls.from_pretrained(dtype=dtype)`` keeps in float32. diffusers keeps
    ``_keep_in_fp32_modules`` for any dtype; transformers only when loading float16 (its
    ``_keep_in_fp32_modules_strict`` for float16 and bfloat16)."""
    if hasattr(model_cls, "_keep_in_fp32_modules_strict"):  # a transformers model
        keep = list(model_cls._keep_in_fp32_modules or []) if dtype == torch.float16 else []
        if dtype in (torch.float16, torch.bfloat16):
            keep += list(model_cls._keep_in_fp32_modules_strict or [])
        return keep
    return list(getattr(model_cls, "_keep_in_fp32_modules", None) or [])


def load_whole(model: nn.Module, weights: SafetensorsWeights) -> nn.Module:
    """Give every meta tensor of ``model`` (after ``weights.apply_dtypes``) host memory filled from ``weights``: the
    whole module in host memory, narrow tensors widened. Reads concurrently; returns the module (eval, no grad)."""
    return materialize(model, weights.fill_many)


def read_model_config(model_cls: type, folder: Path) -> dict:
    try:
        return dict(model_cls.load_config(str(folder)))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot read config.json ({e}). Point at a Diffusers-format model folder.") from e


class SafetensorsWeights:
    """The tensors of a model stored in one or more safetensors files, read on demand.

    Use as a context manager; the files stay open while it is. Call :meth:`apply_dtypes` on the empty model first,
    so its meta tensors carry the dtypes the loaded tensors will have; then the offloader calls the object as
    ``weights(name, current, dest)`` (or :meth:`fill_many` for a batch) to fill ``dest``, host or GPU memory, or
    :meth:`read_rows` for a row range of one tensor (an FSDP shard).

    ``key_for`` maps a model tensor name to the key it has in the files (identity for Diffusers folders), and
    ``scale_key_for`` to the key of its per-tensor scale, if it has one (ComfyUI's scaled fp8 files).
    """

    def __init__(
        self,
        files: list[Path],
        dtype: torch.dtype | None,
        keep_in_fp32_modules: list[str] | None,
        key_for: Callable[[str], str] | None = None,
        describe: str = "",
        scale_key_for: Callable[[str], str | None] | None = None,
    ):
        self.describe = describe or (str(files[0].parent) if files else "weights")
        self.dtype = dtype
        self.keep_in_fp32_modules = list(keep_in_fp32_modules or [])
        self._key_for = key_for or (lambda name: name)
        self._scale_key_for = scale_key_for or (lambda name: None)
        self._targets: dict[str, torch.dtype] = {}
        """Model name -> the dtype ``apply_dtypes`` gave it (what narrow tensors are widened to)."""
        self._files: list[SafetensorsFile] = []
        self._entries: dict[str, tuple[SafetensorsFile, TensorEntry]] = {}
        self._to_read: set[str] = set()
        """Model names read from the files: the model's persistent tensors (state_dict keys), as from_pretrained."""
        self._pool = None
        try:
            for path in files:
                handle = SafetensorsFile(path)
                self._files.append(handle)
                for key, entry in handle.entries.items():
                    self._entries[key] = (handle, entry)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype | None, keep_in_fp32_modules: list[str] | None) -> SafetensorsWeights:
        return cls(folder_weight_files(Path(folder)), dtype, keep_in_fp32_modules, describe=str(folder))

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the files and the reader threads. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for handle in self._files:
            handle.close()

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor in the files (what the model weighs as stored)."""
        return sum(entry.nbytes for _, entry in self._entries.values())

    def _entry(self, name: str) -> tuple[SafetensorsFile, TensorEntry] | None:
        return self._entries.get(self._key_for(name))

    def __contains__(self, name: str) -> bool:
        return self._entry(name) is not None

    def file_dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[1].dtype

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
        self._to_read = {name for name in persistent if name in self}
        for ref in tensor_refs(model):
            tensor = ref.get()
            if ref.name not in self._to_read:
                if tensor.is_meta:
                    missing.append(ref.name)
                continue
            shape = self._entry(ref.name)[1].shape
            if shape != tuple(tensor.shape):
                mismatched.append(f"{ref.name}: file {shape}, model {tuple(tensor.shape)}")
                continue
            dtype = self.target_dtype(ref.name, tensor.dtype)
            self._targets[ref.name] = dtype
            if tensor.dtype != dtype:
                ref.rebind(torch.empty(tensor.shape, dtype=dtype, device="meta"))
        if missing or mismatched:
            details = "; ".join(
                ([f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else [])
                + ([f"wrong shape: {'; '.join(mismatched[:8])}"] if mismatched else [])
            )
            raise ModelLoadError(
                f"{self.describe}: the weights do not match {type(model).__name__}'s config ({details}). The model "
                "is incomplete or belongs to another variant; re-download it or pick the matching files."
            )
        unexpected = len(self._entries) - len(self._to_read)
        if unexpected > 0:
            logger.debug("%s: ignoring %d tensors the model does not use", self.describe, unexpected)

    def scale(self, name: str) -> torch.Tensor | None:
        """The per-tensor scale of ``name`` (float32, 0-dim), or None when it has none."""
        key = self._scale_key_for(self._key_for(name))
        if key is None:
            return None
        found = self._entries.get(key)
        if found is None:
            return None
        handle, entry = found
        if entry.shape not in ((), (1,)) or not entry.dtype.is_floating_point:
            raise ModelLoadError(
                f"{self.describe}: {key} should be a one-element float scale, not {entry.dtype} {list(entry.shape)}. "
                "Fix: re-download the file."
            )
        return handle.read(entry.name).reshape(()).to(torch.float32)

    def stored_format(self, name: str, current: torch.Tensor) -> StoredFormat | None:
        """How a layerwise offloader may keep ``name`` in host memory: its stored bytes (fp8, plus its scale) when
        the file holds it narrower than ``current``'s dtype, the dtype it computes in; None: fill it as usual."""
        found = self._entry(name) if name in self._to_read else None
        if found is None or found[1].dtype not in NARROW_FLOATS or current.dtype == found[1].dtype:
            return None
        return StoredFormat(found[1].dtype, self.scale(name))

    def __call__(self, name: str, current: torch.Tensor, dest: torch.Tensor) -> None:
        """Fill ``dest`` with tensor ``name``: from the files if stored there, else (a non-persistent buffer that
        ``__init__`` computed) from ``current``. A narrow (fp8) tensor filled into a wider dtype is widened with
        ComfyUI's rule; into its own dtype, its bytes are copied as they are (the offloader's stored form)."""
        if name not in self._to_read:
            if current.is_meta:  # apply_dtypes already refuses this; kept so a direct call cannot leave garbage
                raise ModelLoadError(f"{self.describe}: tensor {name} is not in the files")
            dest.copy_(current)
            return
        handle, entry = self._entry(name)
        if entry.dtype == dest.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            handle.read_into(entry.name, dest)
        elif entry.dtype in NARROW_FLOATS and dest.dtype != entry.dtype:
            dest.copy_(dequantize(handle.read(entry.name), self.scale(name), dest.dtype))
        else:
            dest.copy_(handle.read(entry.name))

    def read_rows(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (the whole tensor when ``rows`` is None), in the file's dtype -
        except narrow (fp8) tensors, which come widened to the dtype ``apply_dtypes`` gave them (a per-tensor scale
        applies to every row alike)."""
        found = self._entry(name)
        if found is None:
            raise ModelLoadError(f"{self.describe}: tensor {name} is not in the files")
        handle, entry = found
        values = handle.read(entry.name, rows)
        target = self._targets.get(name)
        if entry.dtype in NARROW_FLOATS and target is not None and target != entry.dtype:
            values = dequantize(values, self.scale(name), target)
        return values

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
