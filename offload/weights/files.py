"""Opening a model folder's files safely: regular files only, inside the model folder only, never echoed.

A model folder comes from the internet or from a shared disk. Three things must not happen because of what is in
it: a read that never returns (a FIFO or a device named ``config.json`` or ``*.safetensors.index.json``), a read
outside it (a component, or a file, that is a symlink to ``/etc/shadow``), and an error message that repeats the
bytes of whatever was read. Every JSON file the pack reads goes through :func:`read_text`, and every component is
walked by :func:`check_component_files` before any library (transformers' tokenizer, a processor) opens files of
its own.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ModelLoadError

MAX_JSON_BYTES = 64 * 2**20
"""A model's JSON files (configs, shard indexes, tokenizer.json) are at most a few tens of MB."""
MAX_FOLDER_ENTRIES = 10_000
"""Files walked per component; a real component has a handful (a tokenizer a dozen)."""


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path`` after proving it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the check is made on the
    opened descriptor (``fstat``), so a file swapped for a FIFO after a ``stat`` cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot open ({os.strerror(e.errno) if e.errno else e}).") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelLoadError(f"{path} is not a regular file (a FIFO, a device or a socket). Fix: replace it with "
                                 "the file it should be (download it again).")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. Errors name the file, never its content."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ModelLoadError(f"{path}: {what} is {size} bytes, more than the {limit} a model's {what} can be. "
                                 f"Fix: re-download {path.name}.")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ModelLoadError(f"{path}: {what} is larger than {limit} bytes. Fix: re-download {path.name}.")
            chunks.append(chunk)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({os.strerror(e.errno) if e.errno else type(e).__name__}). "
                             "Fix: download it again.") from e
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: {what} is not UTF-8 text. Fix: re-download {path.name}.") from None


def confinement_root(root: Path) -> Path:
    """The folder every file of the model at ``root`` must resolve into: the model folder itself, or - for a
    Hugging Face cache snapshot (``models--org--name/snapshots/<revision>``), whose files are links into the
    repository's ``blobs/`` - that repository's folder."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def check_inside(path: Path, boundary: Path, where: Path) -> Path:
    """``path`` resolved; refused (naming ``path``, not where it leads) when it leads outside ``boundary``."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a dangling link, a loop
        raise ModelLoadError(f"{path} is a broken link. Fix: download the '{where.name}' folder again.") from e
    if real != boundary and boundary not in real.parents:
        raise ModelLoadError(
            f"{path} is a link that leads outside the model folder {boundary}. Every component and file of a model "
            "must be inside its folder. Fix: copy the files into the model folder (or hard-link them, which shares "
            "the disk space) instead of linking them with a symlink."
        )
    return real


def check_component_files(folder: Path, boundary: Path) -> None:
    """``folder`` and everything in it lead inside ``boundary`` and are folders or regular files."""
    check_inside(folder, boundary, folder)
    seen = 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise ModelLoadError(f"{current} is not a folder. Fix: download the '{folder.name}' folder again.") from e
            raise ModelLoadError(f"{current}: cannot list ({os.strerror(e.errno) if e.errno else e}).") from e
        for entry in entries:
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                raise ModelLoadError(f"{folder} holds more than {MAX_FOLDER_ENTRIES} files; a model component has a "
                                     "few. Fix: point at the model folder itself.")
            path = Path(entry.path)
            real = check_inside(path, boundary, folder)
            mode = real.stat().st_mode
            if stat.S_ISDIR(mode):
                if not entry.is_symlink():  # a linked folder is confined above; never walk through links twice
                    pending.append(path)
            elif not stat.S_ISREG(mode):
                raise ModelLoadError(f"{path} is not a regular file (a FIFO, a device or a socket). Fix: delete it, "
                                     f"or download the '{folder.name}' folder again.")
