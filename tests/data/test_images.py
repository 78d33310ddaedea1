"""Tests for resflow.data.images and resflow.data.download.

Real data: scikit-learn digits (always), MNIST from ``<repo>/../shared/data/mnist`` and
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (skipped when absent). All
other formats are exercised with small synthetic files written in their true format.
No test touches the network (downloads use ``file://`` URLs).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resflow.data.download import (
    DOWNLOADS,
    RemoteFile,
    download_file,
    file_md5,
    matches_remote,
    verify_checksum,
)
from resflow.data.formats import cifar10 as cifar10_module
from resflow.data.images import (
    DATA_DIR_ENV,
    FASHION_MNIST_SYSTEM_DIR,
    ImageData,
    load_images,
    read_idx,
)

SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------------------------
# Writers for the true file formats
# ---------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    assert arr.dtype == np.uint8
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    return header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool, magic: bytes | None = None) -> Path:
    data = idx_bytes(arr, magic)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_split(folder: Path, split: str, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


def cifar_batch(n: int, protocol: int = 2) -> tuple[bytes, np.ndarray, list[int]]:
    data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in RNG.integers(0, 10, size=n)]
    batch = {b"batch_label": b"synthetic", b"labels": labels, b"data": data, b"filenames": []}
    return pickle.dumps(batch, protocol=protocol), data, labels


def make_cifar(folder: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        raw, data, labels = cifar_batch(n + i, protocol=2 if i % 2 else pickle.DEFAULT_PROTOCOL)
        (folder / name).write_bytes(raw)
        out[name] = (data, labels)
    return out


def make_tar_gz(archive: Path, folder: Path, arcdir: str = "cifar-10-batches-py") -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f"{arcdir}/{f.name}")


def make_imagenet(folder: Path, size: int, n_train: int = 2, n_val: int = 3) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]
    for i, name in enumerate(names):
        n = n_val if name == "val_data.npz" else n_train + (i % 2)
        data = RNG.integers(0, 256, size=(n, 3 * size * size), dtype=np.uint8)
        labels = RNG.integers(1, 1001, size=n).astype(np.int64)
        np.savez(folder / name, data=data, labels=labels)
        written[name] = (data, labels)
    return written


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------------------------------------
# API basics
# ---------------------------------------------------------------------------------------------


def test_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match="choose one of digits, mnist, fashion-mnist"):
        load_images("svhn")
    with pytest.raises(ValueError, match="choose one of train, test"):
        load_images("digits", split="valid")
    with pytest.raises(ValueError, match="n_bits"):
        load_images("mnist", n_bits=9)
    with pytest.raises(ValueError, match="image_size"):
        load_images("digits", image_size=0)
    with pytest.raises(ValueError, match="path= is only used"):
        load_images("mnist", path="x")


def test_imagedata_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 4, 4), None, 256, "x")
    with pytest.raises(ValueError, match="labels"):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3).long(), 256, "x")
    d = ImageData(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), None, 256, "x")
    assert len(d) == 2 and d.shape == (3, 4, 5)
    assert "n=2" in repr(d)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits() -> None:
    train = load_images("digits", "train")
    test = load_images("digits", "test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.levels == test.levels == 17
    assert int(train.images.max()) == 16 and int(train.images.min()) == 0
    assert set(train.labels.tolist()) == set(range(10))
    # Disjoint: together they are exactly sklearn's 1797 images in order.
    from sklearn.datasets import load_digits

    ref = torch.from_numpy(load_digits().images.astype(np.uint8))[:, None]
    assert torch.equal(torch.cat([train.images, test.images]), ref)
    assert len(train) + len(test) == 1797


def test_digits_rejects_bit_reduction_and_resizes() -> None:
    with pytest.raises(ValueError, match="17 levels"):
        load_images("digits", n_bits=4)
    assert load_images("digits", n_bits=8).levels == 17
    big = load_images("digits", "test", image_size=16)
    assert big.images.shape == (297, 1, 16, 16) and int(big.images.max()) <= 16


# ---------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} not present")
def test_real_mnist() -> None:
    train = load_images("mnist", "train", SHARED_MNIST)
    test = load_images("mnist", "test", SHARED_MNIST)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.levels == 256 and train.shape == (1, 28, 28)
    assert train.images.float().mean().item() == pytest.approx(33.318, abs=1e-3)
    assert train.labels.min() == 0 and train.labels.max() == 9
    assert torch.equal(torch.unique(test.labels), torch.arange(10))


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} not present")
def test_real_mnist_verify_accepts_recompressed_train_images() -> None:
    # The shared train-images .gz was re-compressed: its .gz md5 is not the official one, but
    # its uncompressed content is.
    remote = {r.filename: r for r in DOWNLOADS["mnist"]}["train-images-idx3-ubyte.gz"]
    path = SHARED_MNIST / remote.filename
    assert file_md5(path) != remote.md5
    assert matches_remote(path, remote)
    d = load_images("mnist", "test", SHARED_MNIST, verify=True, n_bits=5)
    assert d.levels == 32 and int(d.images.max()) == 31


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    train = load_images("fashion-mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28) and len(train.labels) == 60000
    assert train.images.float().mean().item() == pytest.approx(72.94, abs=0.01)
    # An empty data_dir falls back to the system folder too.
    test = load_images("fashion-mnist", "test", tmp_path, verify=True)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))


# ---------------------------------------------------------------------------------------------
# Synthetic IDX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "mnist", "mnist/raw"])
def test_idx_roundtrip(tmp_path: Path, gz: bool, layout: str) -> None:
    images, labels = make_idx_split(tmp_path / layout, "train", 7, gz)
    d = load_images("mnist", "train", tmp_path)
    assert d.images.shape == (7, 1, 28, 28)
    assert np.array_equal(d.images[:, 0].numpy(), images)
    assert np.array_equal(d.labels.numpy(), labels.astype(np.int64))
    assert d.name == "mnist" and d.levels == 256


def test_idx_env_var_and_n_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = make_idx_split(tmp_path / "fashion-mnist", "test", 4, gz=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    d = load_images("fashion-mnist", "test", n_bits=3)
    assert d.levels == 8
    assert np.array_equal(d.images[:, 0].numpy(), images >> 5)


def test_idx_resize(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "test", 3, gz=False)
    d = load_images("mnist", "test", tmp_path, image_size=32)
    assert d.images.shape == (3, 1, 32, 32) and d.images.dtype == torch.uint8


def test_idx_truncated(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX file truncated"):
        read_idx(path)
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(idx_bytes(images))[:-50])  # truncated gzip stream
    with pytest.raises(ValueError, match=r"t\.gz: corrupt or truncated gzip"):
        read_idx(gz)
    (tmp_path / "extra").write_bytes(idx_bytes(images) + b"\0")
    with pytest.raises(ValueError, match="trailing data"):
        read_idx(tmp_path / "extra")


def test_idx_wrong_magic(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=True, magic=b"\x12\x34\x08\x03")
    make_idx_split(tmp_path / "other", "train", 2, gz=True)
    (tmp_path / "other" / "train-labels-idx1-ubyte.gz").rename(
        tmp_path / "train-labels-idx1-ubyte.gz"
    )
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not an IDX file: bad"):
        load_images("mnist", "train", tmp_path)


def test_idx_wrong_ndim_and_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "a" / "t10k-images-idx3-ubyte", np.zeros((3, 4), np.uint8), gz=False)
    write_idx(tmp_path / "a" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(ValueError, match="has 2 dimension"):
        load_images("mnist", "test", tmp_path / "a")
    write_idx(tmp_path / "b" / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), gz=True)
    write_idx(tmp_path / "b" / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(ValueError, match="holds 3 images but .*t10k-labels.* holds 4 labels"):
        load_images("mnist", "test", tmp_path / "b")


def test_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_images("mnist", "train", tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "train-labels-idx1-ubyte[.gz]" in msg
    assert str(tmp_path / "mnist" / "raw") in msg and "download=True" in msg
    assert "ossci-datasets.s3.amazonaws.com/mnist/" in msg
    # Only the labels missing: only they are named.
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), gz=True)
    with pytest.raises(FileNotFoundError, match=r"missing file\(s\) t10k-labels-idx1-ubyte\[") as e:
        load_images("mnist", "test", tmp_path)
    assert "t10k-images" not in str(e.value).split("Looked in")[0]
    with pytest.raises(FileNotFoundError, match="no data_dir was given"):
        load_images("mnist")


def test_idx_verify_rejects_non_official(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "test", 2, gz=True)
    with pytest.raises(ValueError, match="is not the official mnist file"):
        load_images("mnist", "test", tmp_path, verify=True)


def test_idx_download_via_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "server"
    images, labels = make_idx_split(src, "test", 5, gz=True)
    table = tuple(
        RemoteFile(f.name, f.as_uri(), file_md5(f), file_md5(f, decompress=True))
        for f in sorted(src.iterdir())
    )
    monkeypatch.setitem(DOWNLOADS, "mnist", table)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="needs a destination"):
        load_images("mnist", "test", download=True, progress=False)
    d = load_images("mnist", "test", root, download=True, progress=False)
    assert np.array_equal(d.images[:, 0].numpy(), images)
    assert (root / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    # A corrupt local copy is replaced on download=True.
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    d = load_images("mnist", "test", root, download=True, progress=False)
    assert np.array_equal(d.labels.numpy(), labels)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", ""])
def test_cifar_batches(tmp_path: Path, sub: str) -> None:
    written = make_cifar(tmp_path / sub)
    train = load_images("cifar10", "train", tmp_path)
    test = load_images("cifar10", "test", tmp_path)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    data = np.concatenate([written[n][0] for n in names]).reshape(-1, 3, 32, 32)
    labels = sum((written[n][1] for n in names), [])
    assert train.images.shape == (len(labels), 3, 32, 32) and train.levels == 256
    assert np.array_equal(train.images.numpy(), data)
    assert train.labels.tolist() == labels
    assert np.array_equal(test.images.numpy(), written["test_batch"][0].reshape(-1, 3, 32, 32))
    # Channel-planar: the first 1024 values of a row are the red 32x32 plane.
    assert np.array_equal(test.images[0, 0].numpy().ravel(), written["test_batch"][0][0, :1024])


def test_cifar_archive_extracted(tmp_path: Path) -> None:
    written = make_cifar(tmp_path / "staging")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    make_tar_gz(tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz", tmp_path / "staging")
    d = load_images("cifar10", "test", tmp_path / "data", n_bits=4)
    assert (tmp_path / "data" / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert d.levels == 16
    ref = written["test_batch"][0].reshape(-1, 3, 32, 32) >> 4
    assert np.array_equal(d.images.numpy(), ref)
    leftovers = [p.name for p in (tmp_path / "data" / "cifar10").iterdir()]
    assert sorted(leftovers) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_archive_unsafe_member(tmp_path: Path) -> None:
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="cifar-10-batches-py/../../evil.txt")
    with pytest.raises(ValueError, match="unsafe path"):
        load_images("cifar10", "test", tmp_path)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_cifar_download_via_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_cifar(tmp_path / "staging")
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_tar_gz(archive, tmp_path / "staging")
    remote = RemoteFile(archive.name, archive.as_uri(), file_md5(archive))
    monkeypatch.setitem(DOWNLOADS, "cifar10", (remote,))
    # download=True verifies the extracted batches: accept the synthetic ones.
    synthetic_md5 = {n: file_md5(tmp_path / "staging" / n) for n in written}
    monkeypatch.setattr(cifar10_module, "CIFAR10_BATCH_MD5", synthetic_md5)
    d = load_images("cifar10", "test", tmp_path / "root", download=True, progress=False)
    assert (tmp_path / "root" / "cifar10" / archive.name).is_file()
    assert d.labels.tolist() == written["test_batch"][1]


def test_cifar_corrupt_pickle(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"test_batch is not a valid CIFAR-10 python batch"):
        load_images("cifar10", "test", tmp_path)
    (tmp_path / "test_batch").write_bytes(b"garbage bytes, not a pickle")
    with pytest.raises(ValueError, match="not a valid CIFAR-10 python batch"):
        load_images("cifar10", "test", tmp_path)


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(ValueError, match="refusing to load global"):
        load_images("cifar10", "test", tmp_path)


def test_cifar_bad_content(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"b'data' must be uint8 \[N, 3072\]"):
        load_images("cifar10", "test", tmp_path)


def test_cifar_missing(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load_images("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert "data_batch_5" in msg and "cifar-10-python.tar.gz" in msg and "download=True" in msg


def test_cifar_verify_rejects_synthetic(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    with pytest.raises(ValueError, match="does not match the official"):
        load_images("cifar10", "test", tmp_path, verify=True)


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet
# ---------------------------------------------------------------------------------------------


def test_imagenet32_roundtrip(tmp_path: Path) -> None:
    written = make_imagenet(tmp_path / "imagenet32" / "Imagenet32_train_npz", 32)
    # Move the validation file to its own folder, as in the official zips.
    val = tmp_path / "imagenet32" / "Imagenet32_val_npz"
    val.mkdir()
    (tmp_path / "imagenet32" / "Imagenet32_train_npz" / "val_data.npz").rename(val / "val_data.npz")
    train = load_images("imagenet32", "train", tmp_path)
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
    data = np.concatenate([written[n][0] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([written[n][1] for n in names])
    assert np.array_equal(train.images.numpy(), data)
    assert np.array_equal(train.labels.numpy(), labels - 1)  # 1-based -> 0-based
    assert train.labels.dtype == torch.int64 and train.shape == (3, 32, 32)
    test = load_images("imagenet32", "test", tmp_path, n_bits=5)
    assert np.array_equal(
        test.images.numpy(), written["val_data.npz"][0].reshape(-1, 3, 32, 32) >> 3
    )
    assert test.levels == 32


def test_imagenet64_flat_folder(tmp_path: Path) -> None:
    written = make_imagenet(tmp_path, 64, n_train=1, n_val=2)
    d = load_images("imagenet64", "test", tmp_path)
    assert d.images.shape == (2, 3, 64, 64)
    assert np.array_equal(d.images.numpy(), written["val_data.npz"][0].reshape(2, 3, 64, 64))


def test_imagenet_missing_and_download(tmp_path: Path) -> None:
    make_imagenet(tmp_path, 32)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7\.npz.*image-net\.org"):
        load_images("imagenet32", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically"):
        load_images("imagenet64", "test", tmp_path / "empty", download=True)


def test_imagenet_bad_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(ValueError, match=r"val_data\.npz lacks the key\(s\) \['labels'\]"):
        load_images("imagenet32", "test", tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=[0, 5])
    with pytest.raises(ValueError, match="1-based"):
        load_images("imagenet32", "test", tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 5])
    with pytest.raises(ValueError, match=r"'data' must be uint8 \[2, 3072\]"):
        load_images("imagenet32", "test", tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_images("imagenet32", "test", tmp_path)


# ---------------------------------------------------------------------------------------------
# CelebA-HQ and image folders
# ---------------------------------------------------------------------------------------------


def test_celebahq_5bit(tmp_path: Path) -> None:
    imgs = RNG.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        write_png(tmp_path / "celebahq" / "train" / f"{i:05d}.png", a)
    write_png(tmp_path / "celebahq" / "test" / "0.png", imgs[0])
    d = load_images("celebahq", "train", tmp_path)
    assert d.levels == 32 and d.images.shape == (3, 3, 8, 8) and d.labels is None
    assert np.array_equal(d.images.numpy(), imgs.transpose(0, 3, 1, 2) >> 3)
    d8 = load_images("celebahq", "test", tmp_path, n_bits=8)
    assert d8.levels == 256 and np.array_equal(d8.images[0].numpy(), imgs[0].transpose(2, 0, 1))
    small = load_images("celebahq", "train", tmp_path, image_size=4)
    assert small.images.shape == (3, 3, 4, 4) and int(small.images.max()) <= 31


def test_celebahq_grayscale_becomes_rgb_and_missing(tmp_path: Path) -> None:
    write_png(tmp_path / "test" / "a.png", np.full((4, 4), 200, np.uint8))
    d = load_images("celebahq", "test", tmp_path)
    assert d.shape == (3, 4, 4) and int(d.images.max()) == 200 >> 3
    with pytest.raises(FileNotFoundError, match="no public direct download"):
        load_images("celebahq", "train", tmp_path)


def test_folder_gray_rgb_and_splits(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, size=(2, 5, 6), dtype=np.uint8)
    write_png(tmp_path / "g" / "b.png", gray[1])
    write_png(tmp_path / "g" / "sub" / "a.png", gray[0])  # recursive, sorted by path
    (tmp_path / "g" / "notes.txt").write_text("ignored")
    d = load_images("folder", path=tmp_path / "g")
    assert d.shape == (1, 5, 6) and d.levels == 256 and d.labels is None
    assert np.array_equal(d.images[:, 0].numpy(), gray[[1, 0]])
    with pytest.raises(FileNotFoundError, match="no 'test' subfolder"):
        load_images("folder", "test", path=tmp_path / "g")

    rgb = RNG.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    write_png(tmp_path / "m" / "train" / "0.png", gray[0])
    write_png(tmp_path / "m" / "train" / "1.png", rgb)
    write_png(tmp_path / "m" / "test" / "0.jpg", rgb)
    mixed = load_images("folder", "train", path=tmp_path / "m")
    assert mixed.shape == (3, 5, 6)
    assert np.array_equal(mixed.images[0].numpy(), np.stack([gray[0]] * 3))
    assert np.array_equal(mixed.images[1].numpy(), rgb.transpose(2, 0, 1))
    assert len(load_images("folder", "test", path=tmp_path / "m", n_bits=6)) == 1


def test_folder_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match="2 different sizes.*image_size"):
        load_images("folder", path=tmp_path)
    d = load_images("folder", path=tmp_path, image_size=3)
    assert d.images.shape == (2, 1, 3, 3)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"c\.png: cannot read image"):
        load_images("folder", path=tmp_path, image_size=3)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_images("folder", path=tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_images("folder", path=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# .npy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [
        ((4, 5, 6), lambda a: a[:, None]),
        ((4, 5, 6, 1), lambda a: a.transpose(0, 3, 1, 2)),
        ((4, 5, 6, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((4, 1, 5, 6), lambda a: a),
        ((4, 3, 5, 6), lambda a: a),
    ],
)
def test_npy_layouts(tmp_path: Path, shape: tuple[int, ...], to_nchw) -> None:
    arr = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    d = load_images("npy", path=tmp_path / "x.npy")
    assert d.images.is_contiguous() and d.levels == 256
    assert np.array_equal(d.images.numpy(), to_nchw(arr))
    d4 = load_images("npy", path=tmp_path / "x.npy", n_bits=4)
    assert d4.levels == 16 and np.array_equal(d4.images.numpy(), to_nchw(arr) >> 4)


def test_npy_folder_splits(tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "test.npy", np.ones((2, 4, 4), np.uint8))
    assert len(load_images("npy", "test", path=tmp_path)) == 2
    assert len(load_images("npy", "train", data_dir=tmp_path)) == 3
    with pytest.raises(ValueError, match="single file"):
        load_images("npy", "test", path=tmp_path / "train.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images("npy", path=tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="needs path="):
        load_images("npy")


def test_npy_bad_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"f\.npy: dtype float32 is not supported.*uint8"):
        load_images("npy", path=tmp_path / "f.npy")
    np.save(tmp_path / "d.npy", np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match=r"shape \[2, 4\] is not supported; expected \[N, H, W\]"):
        load_images("npy", path=tmp_path / "d.npy")
    np.save(tmp_path / "c.npy", np.zeros((2, 5, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="C in {1, 3}"):
        load_images("npy", path=tmp_path / "c.npy")
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="cannot read .npy"):
        load_images("npy", path=tmp_path / "o.npy")


# ---------------------------------------------------------------------------------------------
# download.py
# ---------------------------------------------------------------------------------------------


def test_checksums(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    payload = b"resflow" * 1000
    f.write_bytes(payload)
    md5, sha = hashlib.md5(payload).hexdigest(), hashlib.sha256(payload).hexdigest()
    assert file_md5(f) == md5
    verify_checksum(f, md5=md5, sha256=sha.upper())
    with pytest.raises(
        ValueError, match=f"md5 mismatch for .*blob: expected {'0' * 32}, got {md5}"
    ):
        verify_checksum(f, md5="0" * 32)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        verify_checksum(f, sha256="ab" * 32)
    with pytest.raises(FileNotFoundError):
        verify_checksum(tmp_path / "missing", md5=md5)


def test_matches_remote_gzip_variants(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 50
    official = gzip.compress(payload, compresslevel=9, mtime=0)
    remote = RemoteFile(
        "x.gz",
        "file:///dev/null",
        hashlib.md5(official).hexdigest(),
        hashlib.md5(payload).hexdigest(),
    )
    (tmp_path / "a.gz").write_bytes(official)
    (tmp_path / "b.gz").write_bytes(gzip.compress(payload, compresslevel=1, mtime=123))
    (tmp_path / "c").write_bytes(payload)
    (tmp_path / "d.gz").write_bytes(gzip.compress(payload[:-1]))
    (tmp_path / "e.gz").write_bytes(official[:-10])
    assert matches_remote(tmp_path / "a.gz", remote)
    assert matches_remote(tmp_path / "b.gz", remote)  # re-compressed
    assert matches_remote(tmp_path / "c", remote)  # already decompressed
    assert not matches_remote(tmp_path / "d.gz", remote)
    assert not matches_remote(tmp_path / "e.gz", remote)  # truncated gzip
    assert not matches_remote(tmp_path / "missing.gz", remote)


def test_download_file_success_and_skip(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # several chunks
    src.write_bytes(payload)
    md5, sha = hashlib.md5(payload).hexdigest(), hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "sub" / "file.bin"
    assert download_file(src.as_uri(), dest, md5=md5, sha256=sha, progress=False) == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temp files left
    # Existing valid file: no download happens (the source is gone now).
    src.unlink()
    assert download_file(src.as_uri(), dest, md5=md5, progress=True) == dest
    # Existing but corrupt file and unreachable source: clear RuntimeError naming the URL.
    dest.write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match="failed to download file://") as err:
        download_file(src.as_uri(), dest, md5=md5, progress=False)
    assert src.as_uri() in str(err.value) and "place it at" in str(err.value)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_download_file_checksum_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello world")
    dest = tmp_path / "out" / "file.bin"
    actual = hashlib.md5(b"hello world").hexdigest()
    with pytest.raises(ValueError, match=f"expected {'f' * 32}, got {actual}"):
        download_file(src.as_uri(), dest, md5="F" * 32, progress=False)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # temp file removed
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download_file(src.as_uri(), dest, sha256="0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_download_tables() -> None:
    assert set(DOWNLOADS) == {"mnist", "fashion-mnist", "cifar10"}
    for files in DOWNLOADS.values():
        for r in files:
            assert r.url.endswith(r.filename) and len(r.md5) == 32
    mnist = {r.filename: r for r in DOWNLOADS["mnist"]}
    assert mnist["train-images-idx3-ubyte.gz"].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert mnist["train-images-idx3-ubyte.gz"].uncompressed_md5 == (
        "6bbc9ace898e44ae57da46a324031adb"
    )
    assert DOWNLOADS["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
