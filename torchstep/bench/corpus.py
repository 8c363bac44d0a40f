"""Frozen byte corpus: the top-level modules of the CPython 3.11.7 standard library.

Shipped inside the package (``data/stdlib-3.11.7.tar.xz``, 168 files, 4.70 MB raw, 0.91 MB xz) so the
language-model task never downloads anything and does not depend on the local Python version.
Licence: Python Software Foundation License (``data/PSF-LICENSE.txt``).  The content hash
(SHA-256 over ``name`` + bytes of every file in name order) is checked on load.  Fixed split:
every 10th file (in name order) is held out for validation.
"""
from __future__ import annotations

import hashlib
import tarfile
from functools import lru_cache
from importlib import resources

import torch

ARCHIVE = "stdlib-3.11.7.tar.xz"
SHA256 = "097422df36a17005b15218b4fa7767306fecf9c4008d6348ec28224d6c3f7ccd"
LICENSE = "PSF-LICENSE.txt"


@lru_cache(maxsize=1)
def load() -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) as uint8 tensors; raises if the snapshot was altered."""
    path = resources.files("torchstep.bench") / "data" / ARCHIVE
    train, val, digest = bytearray(), bytearray(), hashlib.sha256()
    with resources.as_file(path) as p, tarfile.open(p, "r:xz") as tar:
        members = sorted(tar.getmembers(), key=lambda m: m.name)
        for i, member in enumerate(members):
            data = tar.extractfile(member).read()
            digest.update(member.name.encode())
            digest.update(data)
            (val if i % 10 == 9 else train).extend(data)
    if digest.hexdigest() != SHA256:
        raise RuntimeError(f"corpus snapshot hash mismatch: {digest.hexdigest()} != {SHA256}")
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8)
