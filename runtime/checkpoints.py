"""Checkpoints as safetensors, written atomically and addressed by their SHA-256.

A checkpoint is written to a temporary file in the same directory, flushed, fsynced and then
renamed onto its final name, so a crash can never leave a half-written file under that name.
Loading verifies the digest recorded by the stage that wrote it. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import BaseModel

from runtime.errors import CheckpointError


class Checkpoint(BaseModel):
    """A file of weights and its content digest: what stages pass to each other."""

    path: Path
    sha256: str


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path``; never leaves a partial file.

    Raises:
        ResourceError: the disk is full or read-only (``runtime.faults``); nothing of the
            write is left behind.
    """
    from runtime.faults import resource_error

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise resource_error(exc, path) or exc
    tmp_name: Optional[str] = None
    try:  # from the moment the temporary file exists: a Ctrl-C anywhere still removes it
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                        dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - a full disk is the user's to fix, not a bug
        raise resource_error(exc, path) or exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (name, dtype, shape, bytes), independent of file format;
    0-d tensors (an Adam state's ``step``) included."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def canonical_safetensors(tmp: Path) -> None:
    """Rewrite a safetensors file's JSON header in one canonical form (sorted keys, no
    spaces, padded with spaces to 8 bytes as the format requires), leaving the tensor bytes
    as they are.

    safetensors writes its ``__metadata__`` from a hash map, whose order differs from one
    process to the next: the same tensors and metadata gave files with different SHA-256s,
    so identical runs published different checkpoints and their downstream cache keys
    drifted. The data offsets are relative to the end of the header, so they still hold.
    """
    raw = tmp.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"))
    encoded = header.encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def save_state(
    state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None
) -> Checkpoint:
    """Save tensors to ``path`` as safetensors, atomically, and return its checkpoint record.

    The bytes depend on the tensors and metadata only (``canonical_safetensors``): the same
    state saved by any process has the same SHA-256.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata or {})
        canonical_safetensors(tmp)

    atomic_write(path, write)
    return Checkpoint(path=path, sha256=file_sha256(path))


def load_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint after checking it still has its recorded digest."""
    from safetensors.torch import load_file

    path = Path(checkpoint.path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is missing; rerun with --fresh to recompute the stage"
        )
    found = file_sha256(path)
    if found != checkpoint.sha256:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {found}, expected {checkpoint.sha256}: it was "
            "modified after it was written; rerun with --fresh to recompute the stage"
        )
    return load_file(str(path))
