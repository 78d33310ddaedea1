"""Checksummed, atomic file downloads and the download tables of the image datasets.

Only the Python standard library (:mod:`urllib`, :mod:`hashlib`) and :mod:`tqdm` are used.
A download is streamed into a temporary file *in the destination directory*, hashed while it
is written, verified against the expected checksum and only then moved into place with
:func:`os.replace` (atomic on POSIX and Windows when source and target are on the same file
system). A failed or corrupt download therefore never leaves a partial file under the final
name.

Checksums in the tables below are the published ones:

* MNIST: http://yann.lecun.com/exdb/mnist/ (served by the mirror
  https://ossci-datasets.s3.amazonaws.com/mnist/ that torchvision uses).
* Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (README, "Get the Data").
* CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar.html (archive md5; batch md5s as used by
  torchvision's ``CIFAR10`` dataset).

Besides the md5 of the ``.gz`` files, the IDX tables also store the md5 of the *uncompressed*
content. Re-compressing a file changes the ``.gz`` bytes but not the data (e.g. the Debian
package ``dataset-fashion-mnist`` or an offline copy of MNIST), so a local file is accepted if
either its own md5 or the md5 of its decompressed content matches (see :func:`matches_remote`).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DOWNLOADS",
    "RemoteFile",
    "download_file",
    "download_remote",
    "file_md5",
    "file_sha256",
    "matches_remote",
    "verify_checksum",
]

_CHUNK = 1 << 20  # 1 MiB read size for hashing and downloading
_GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """A download failed (no network, HTTP error, ...)."""


def _iter_file(path: Path, decompress: bool = False) -> Iterable[bytes]:
    """Yield the bytes of ``path`` in chunks, gunzipped first if ``decompress`` is true."""
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _hash_file(path: str | Path, algorithm: str, decompress: bool = False) -> str:
    h = hashlib.new(algorithm)
    for chunk in _iter_file(Path(path), decompress):
        h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | Path, *, decompress: bool = False) -> str:
    """Hex md5 digest of a file (of its gunzipped content if ``decompress=True``)."""
    return _hash_file(path, "md5", decompress)


def file_sha256(path: str | Path, *, decompress: bool = False) -> str:
    """Hex sha256 digest of a file (of its gunzipped content if ``decompress=True``)."""
    return _hash_file(path, "sha256", decompress)


def verify_checksum(path: str | Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Check ``path`` against the given md5 and/or sha256 digests.

    Digests are compared case-insensitively; a digest that is ``None`` is not checked, so with
    both ``None`` this only checks that the file exists.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a mismatch; the message names the file and gives expected vs. actual.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot verify checksum: {path} does not exist")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = _hash_file(path, algorithm)
        if actual.lower() != expected.lower():
            raise ValueError(
                f"{algorithm} mismatch for {path}: expected {expected.lower()}, got {actual}. "
                "The file is corrupt or incomplete; delete it and download it again."
            )


def _matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    try:
        verify_checksum(path, md5=md5, sha256=sha256)
    except (ValueError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying the checksum(s) if given.

    Steps: (1) if ``dest`` already exists and matches the given checksum(s) (or no checksum is
    given), return it without downloading; (2) stream the URL into a temporary file in
    ``dest``'s directory, with a :mod:`tqdm` progress bar when ``progress`` is true, hashing it
    on the fly; (3) compare the digests; on a mismatch delete the temporary file and raise;
    (4) :func:`os.replace` the temporary file onto ``dest``.

    Any URL scheme :func:`urllib.request.urlopen` supports works, including ``file://``.

    Args:
        url: Source URL.
        dest: Destination file path; parent directories are created.
        md5: Expected hex md5 of the downloaded bytes, or ``None``.
        sha256: Expected hex sha256 of the downloaded bytes, or ``None``.
        progress: Show a progress bar on stderr.
        timeout: Socket timeout in seconds for the connection and each read.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: if the download itself fails (network error, HTTP error, ...).
        ValueError: if the downloaded bytes do not match ``md5``/``sha256``; ``dest`` is left
            untouched and the temporary file is removed.
    """
    dest = Path(dest)
    if dest.is_file() and _matches(dest, md5, sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm  # imported lazily: only needed when actually downloading

    hashers = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                ) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        for h in hashers.values():
                            h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            raise DownloadError(
                f"failed to download {url} -> {dest}: {err}. If this machine has no internet "
                f"access, download the file elsewhere and place it at {dest} (or in your data_dir)."
            ) from err

        for algorithm, expected in (("md5", md5), ("sha256", sha256)):
            if expected is None:
                continue
            actual = hashers[algorithm].hexdigest()
            if actual.lower() != expected.lower():
                raise ValueError(
                    f"{algorithm} mismatch for download of {url}: expected {expected.lower()}, "
                    f"got {actual}. The download was discarded; {dest} was not written."
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace
    return dest


# ---------------------------------------------------------------------------------------------
# Download tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of a dataset.

    Attributes:
        filename: Name of the file as served and as stored locally.
        url: Full download URL.
        md5: md5 of the file as served (for ``.gz`` files: of the compressed bytes).
        uncompressed_md5: For ``.gz`` files, md5 of the decompressed content, or ``None``.
    """

    filename: str
    url: str
    md5: str
    uncompressed_md5: str | None = None


def matches_remote(path: str | Path, remote: RemoteFile) -> bool:
    """Whether the local file ``path`` holds the content of ``remote``.

    Accepted are: the exact served bytes (``remote.md5``); a gzip file, possibly re-compressed,
    whose decompressed content has ``remote.uncompressed_md5``; or an already-decompressed file
    with ``remote.uncompressed_md5``.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == _GZIP_MAGIC
        if file_md5(path) == remote.md5:
            return True
        if remote.uncompressed_md5 is None:
            return False
        return file_md5(path, decompress=is_gzip) == remote.uncompressed_md5
    except (OSError, EOFError):  # unreadable or corrupt gzip stream
        return False


def download_remote(remote: RemoteFile, root: str | Path, progress: bool = True) -> Path:
    """Download ``remote`` into directory ``root`` unless a matching copy is already there."""
    dest = Path(root) / remote.filename
    if matches_remote(dest, remote):
        return dest
    return download_file(remote.url, dest, md5=remote.md5, progress=progress)


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _remote(base: str, name: str, md5: str, uncompressed_md5: str | None = None) -> RemoteFile:
    return RemoteFile(name, base + name, md5, uncompressed_md5)


#: Download tables, keyed by dataset name. The uncompressed md5s of MNIST were computed from
#: the official files; those of Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
#: (upstream git 55506a9), which re-compresses the upstream data.
DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        _remote(
            _MNIST_URL,
            "train-images-idx3-ubyte.gz",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "6bbc9ace898e44ae57da46a324031adb",
        ),
        _remote(
            _MNIST_URL,
            "train-labels-idx1-ubyte.gz",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "a25bea736e30d166cdddb491f175f624",
        ),
        _remote(
            _MNIST_URL,
            "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "2646ac647ad5339dbf082846283269ea",
        ),
        _remote(
            _MNIST_URL,
            "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    ),
    "fashion-mnist": (
        _remote(
            _FASHION_URL,
            "train-images-idx3-ubyte.gz",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ),
        _remote(
            _FASHION_URL,
            "train-labels-idx1-ubyte.gz",
            "25c81989df183df01b3e8a0aad5dffbe",
            "9018921c3c673c538a1fc5bad174d6f9",
        ),
        _remote(
            _FASHION_URL,
            "t10k-images-idx3-ubyte.gz",
            "bef4ecab320f06d8554ea6380940ec79",
            "8181f5470baa50b63fa0f6fddb340f0a",
        ),
        _remote(
            _FASHION_URL,
            "t10k-labels-idx1-ubyte.gz",
            "bb300cfdad3c16e7a12a480ee83cd310",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
    ),
}

#: md5 of the extracted CIFAR-10 batch files (``cifar-10-batches-py/<name>``).
CIFAR10_BATCH_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
