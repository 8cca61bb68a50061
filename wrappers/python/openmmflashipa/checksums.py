"""SHA-256 checksums of files, as recorded for data sets, checkpoints and downloaded weights."""

import hashlib


def fileSha256(path):
    """The SHA-256 of a file's bytes, as a hex string (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
