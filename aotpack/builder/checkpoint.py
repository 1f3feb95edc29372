"""Read a component folder's safetensors files tensor by tensor, never a pickle (the weights a build streams)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aotpack.artifact.files import read_safetensors_header
from aotpack.errors import BuildError


class _SafetensorsFile:
    """One .safetensors file read tensor by tensor with ``pread`` into fresh memory.

    Not ``safe_open``: its memory map leaves every byte read resident in this process (counted in RSS) until
    the file is closed, which is exactly the peak a weight-by-weight build avoids. Measured on this repo's
    2-core box (AVX-512 VNNI), every tensor of flux-blocks' transformer (2 GB of fp32) read one at a time and
    kept as an int8 copy, page cache warm, fresh process each: ``safe_open`` peak RSS 2752 MiB in 0.2 s, this
    reader 946 MiB in 1.7 s. 1.8 GB less at the peak for 1.5 s per 2 GB read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.entries = read_safetensors_header(self._fd, os.fstat(self._fd).st_size, path.name, BuildError)
        except BaseException:
            os.close(self._fd)
            raise

    def get(self, key: str) -> Any:
        import torch

        e = self.entries[key]
        buf = bytearray(e.nbytes)
        view, done = memoryview(buf), 0
        while done < e.nbytes:
            got = os.preadv(self._fd, [view[done:]], e.offset + done)
            if got <= 0:
                raise BuildError(f"{self.path.name} ends early", "download the checkpoint again")
            done += got
        dtype = getattr(torch, e.dtype)
        t = torch.frombuffer(buf, dtype=dtype) if e.nbytes else torch.empty(0, dtype=dtype)
        return t.reshape(e.shape)

    def close(self) -> None:
        os.close(self._fd)


class CheckpointReader:
    """Tensors of one component folder's safetensors files, read one at a time (never pickles)."""

    def __init__(self, folder: Path, files: list[str | Path] | None = None) -> None:
        """``files``: the paths to read (default: every .safetensors file of ``folder``), e.g. verified open
        files (/proc/self/fd/N) so that the bytes read are the bytes that were hashed."""
        self.folder = folder
        paths = [Path(p) for p in files] if files is not None else sorted(folder.glob("*.safetensors"))
        if not paths:
            pickled = sorted(p.name for p in folder.glob("*.bin"))
            raise BuildError(
                f"{folder} holds no safetensors weights" + (f" (only pickled {pickled[0]})" if pickled else ""),
                "aotpack reads weights from safetensors only; convert the checkpoint with save_pretrained",
            )
        self._where: dict[str, _SafetensorsFile] = {}
        self._files = []
        try:
            for path in paths:
                self._files.append(_SafetensorsFile(path))
        except BaseException:
            self.close()
            raise
        for f in self._files:
            for key in f.entries:
                self._where[key] = f

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Any:
        return self._where[key].get(key)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
