"""Dataset loaders: every loader on fixtures written in tmp_path, and every bad input."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from globalpool.lab.data import (
    DATASET_NAMES,
    Dataset,
    DatasetError,
    load_cifar10,
    load_dataset,
    load_digits_shifted,
    load_folder,
    load_mnist1d,
    subsample_indices,
    write_cifar10_fixture,
)
from globalpool.lab.data import cifar10 as cifar10_module
from globalpool.lab.data import folder as folder_module
from globalpool.lab.data.digits_shifted import split_indices


def _one_line(err: pytest.ExceptionInfo[DatasetError]) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- common type, subsampling


def test_dataset_rejects_wrong_dtypes_and_shapes() -> None:
    x, y = torch.zeros(4, 1, 8), torch.tensor([0, 1, 0, 1])
    Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
    with pytest.raises(DatasetError, match="float32"):
        Dataset("toy", x.double(), y, x, y, num_classes=2, spatial_rank=1)
    with pytest.raises(DatasetError, match="int64"):
        Dataset("toy", x, y.int(), x, y, num_classes=2, spatial_rank=1)
    with pytest.raises(DatasetError, match="labels outside"):
        Dataset("toy", x, y, x, y + 1, num_classes=2, spatial_rank=1)
    with pytest.raises(DatasetError, match="channels"):
        extra = {"wide": (torch.zeros(4, 2, 8), y)}
        Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1, extra_tests=extra)


def test_subsample_is_stratified_nested_and_deterministic() -> None:
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 100, 100, 100, 100, 100])
    small = subsample_indices(labels, 75, seed=3)
    large = subsample_indices(labels, 300, seed=3)
    assert len(small) == 75 and len(np.unique(small)) == 75
    assert set(small) <= set(large)
    np.testing.assert_array_equal(small, subsample_indices(labels, 75, seed=3))
    assert not np.array_equal(small, subsample_indices(labels, 75, seed=4))
    counts = np.bincount(labels[large], minlength=10)
    assert counts[:5].tolist() == [20] * 5 and counts[5:].tolist() == [40] * 5


@pytest.mark.parametrize("n", [0, 11, -1, True, 2.5])
def test_subsample_rejects_bad_sizes(n: object) -> None:
    with pytest.raises(DatasetError, match="train_size") as err:
        subsample_indices(np.arange(10) % 2, n)  # type: ignore[arg-type]
    _one_line(err)


# ---------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist1d-cache")


def test_mnist1d_default_shapes_cache_and_no_side_effects(
    mnist1d_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()

    ds = load_dataset("mnist1d", data_dir=mnist1d_cache)

    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and ds.spatial_rank == 1
    assert set(ds.y_train.tolist()) == set(range(10))
    assert abs(float(ds.x_train.mean())) < 0.1 and 0.8 < float(ds.x_train.std()) < 1.2
    assert ds.info["generation_args"]["seed"] == 42
    # Nothing written to the cwd; the caller's global RNG state is untouched.
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)
    assert random.getstate() == py_before
    assert len(list((mnist1d_cache / "mnist1d").glob("*.npz"))) == 1

    start = time.perf_counter()
    again = load_dataset("mnist1d", data_dir=mnist1d_cache)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_mnist1d_train_size_and_overrides(mnist1d_cache: Path, tmp_path: Path) -> None:
    ds = load_dataset("MNIST1D", data_dir=mnist1d_cache, train_size=500, seed=1)
    assert ds.x_train.shape == (500, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert torch.bincount(ds.y_train, minlength=10).min() >= 45
    small = load_mnist1d(cache_dir=tmp_path, args={"num_samples": 500})
    assert small.x_train.shape == (400, 1, 40) and small.x_test.shape == (100, 1, 40)
    with pytest.raises(DatasetError, match="unknown generation arguments"):
        load_mnist1d(cache_dir=tmp_path, args={"bogus": 1})


def test_mnist1d_regenerates_a_corrupt_cache(tmp_path: Path) -> None:
    args = {"num_samples": 200}
    first = load_mnist1d(cache_dir=tmp_path, args=args)
    (cache,) = tmp_path.glob("*.npz")
    cache.write_bytes(b"not an npz")
    second = load_mnist1d(cache_dir=tmp_path, args=args)
    assert torch.equal(first.x_train, second.x_train)


# ---------------------------------------------------------------- digits-shifted


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_shifted(seed=0)


def test_digits_shifted_shapes_and_range(digits: Dataset) -> None:
    sets = digits.test_sets()
    assert set(sets) == {"test", "everywhere", "right", "larger-canvas"}
    assert digits.x_train.shape[1:] == (1, 24, 24)
    assert sets["everywhere"][0].shape[1:] == (1, 24, 24)
    assert sets["larger-canvas"][0].shape[1:] == (1, 32, 32)
    assert digits.num_classes == 10 and digits.spatial_rank == 2
    for x, y in [(digits.x_train, digits.y_train), *sets.values()]:
        assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert digits.info["n_real_train"] + digits.info["n_real_test"] == 1797


def test_digits_shifted_placement(digits: Dataset) -> None:
    sets = digits.test_sets()
    # Training and test digits sit only in the left 12 columns.
    assert digits.x_train[..., 12:].eq(0).all() and sets["test"][0][..., 12:].eq(0).all()
    assert sets["right"][0][..., :12].eq(0).all()
    # "everywhere" really spreads the digits: many have ink in the right half, many not.
    x_every = sets["everywhere"][0]
    right_ink = x_every[..., 12:].flatten(1).sum(1) > 0
    assert 0.3 < float(right_ink.float().mean()) < 0.95
    cols = torch.arange(24, dtype=torch.float32)
    centre = (x_every.sum(dim=(1, 2)) * cols).sum(1) / x_every.sum(dim=(1, 2, 3))
    assert float(centre.max() - centre.min()) > 12
    big = sets["larger-canvas"][0]
    assert big[..., 24:].flatten(1).sum(1).gt(0).any()  # positions beyond the 24x24 canvas


def test_digits_shifted_deterministic_and_disjoint(digits: Dataset) -> None:
    same = load_digits_shifted(seed=0)
    other = load_digits_shifted(seed=1)
    assert torch.equal(same.x_train, digits.x_train)
    assert torch.equal(same.extra_tests["everywhere"][0], digits.extra_tests["everywhere"][0])
    assert not torch.equal(other.x_train, digits.x_train)
    assert torch.equal(other.y_test, digits.y_test)  # same held-out digits, new positions
    labels = np.arange(1797) % 10
    train, test = split_indices(labels, 0.25, 0)
    assert not set(train) & set(test) and len(train) + len(test) == 1797
    assert digits.train_size == len(train)


def test_digits_shifted_train_size_and_bad_arguments() -> None:
    ds = load_dataset("digits_shifted", train_size=200, seed=2)
    assert ds.x_train.shape == (200, 1, 24, 24)
    assert torch.bincount(ds.y_train, minlength=10).min() >= 18
    for kwargs in [{"canvas": 6}, {"region_width": 30}, {"large_canvas": 16}, {"seed": -1}]:
        with pytest.raises(DatasetError) as err:
            load_digits_shifted(**kwargs)
        _one_line(err)


# ---------------------------------------------------------------- cifar10


def test_cifar10_fixture_loads(tmp_path: Path) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=4, n_test=6)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.y_train.tolist() == [i % 10 for i in range(20)]
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    with open(batches / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32)
    mean = torch.tensor(cifar10_module.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(cifar10_module.CIFAR10_STD).view(3, 1, 1)
    expected = (torch.from_numpy(raw).float() / 255 - mean) / std
    torch.testing.assert_close(ds.x_train[0], expected)
    # data_dir may also point straight at the batches directory.
    assert load_cifar10(batches, download=False).x_test.shape == (6, 3, 32, 32)


def test_cifar10_missing_files(tmp_path: Path) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=2, n_test=2)
    (batches / "test_batch").unlink()
    with pytest.raises(DatasetError, match="missing test_batch") as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert str(batches) in _one_line(err)
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", download=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_cifar10(tmp_path / "file", download=False)


def test_cifar10_truncated_file_fails_its_checksum(tmp_path: Path) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=2, n_test=2)
    path = batches / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="checksum mismatch") as err:
        load_cifar10(tmp_path, download=False)
    assert str(path) in _one_line(err)


def test_cifar10_official_checksums_apply_without_a_table(tmp_path: Path) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=2, n_test=2)
    (batches / "MD5SUMS").unlink()
    with pytest.raises(DatasetError, match="checksum mismatch.*data_batch_1"):
        load_cifar10(tmp_path, download=False)
    assert load_cifar10(tmp_path, download=False, verify=False).train_size == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "truncated or corrupt"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "outside"),
        ({b"labels": [0]}, "lacks"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar10_bad_pickles(tmp_path: Path, content: object, message: str) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=2, n_test=2)
    path = batches / "data_batch_2"
    if content is None:
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DatasetError, match=message) as err:
        load_cifar10(tmp_path, download=False, verify=False)
    assert str(path) in _one_line(err)


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    batches = write_cifar10_fixture(tmp_path, n_train_per_batch=2, n_test=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (batches / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="forbidden global"):
        load_cifar10(tmp_path, download=False, verify=False)
    assert not marker.exists()


def _fixture_tarball(tmp_path: Path) -> tuple[Path, str]:
    batches = write_cifar10_fixture(tmp_path / "src", n_train_per_batch=3, n_test=4)
    tarball = tmp_path / "fixture.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(batches, arcname=cifar10_module.CIFAR10_DIRNAME)
    return tarball, hashlib.md5(tarball.read_bytes()).hexdigest()


def test_cifar10_download_checks_md5_and_extracts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, md5 = _fixture_tarball(tmp_path)
    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", tarball.as_uri())
    monkeypatch.setattr(cifar10_module, "CIFAR10_TARBALL_MD5", md5)
    root = tmp_path / "data"
    ds = load_dataset("cifar10", data_dir=root)
    assert ds.x_train.shape == (15, 3, 32, 32)
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not list(root.glob("*.part"))


def test_cifar10_download_with_wrong_md5_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, _ = _fixture_tarball(tmp_path)
    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", tarball.as_uri())
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="checksum mismatch for the download") as err:
        load_cifar10(root)
    assert "missing data_batch_1" in _one_line(err)
    assert not list(root.glob("*.tar.gz*"))


def test_cifar10_offline_says_what_is_missing_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", (tmp_path / "absent.tgz").as_uri())
    with pytest.raises(DatasetError, match="download from .* failed") as err:
        load_cifar10(tmp_path / "data")
    message = _one_line(err)
    assert "missing data_batch_1" in message and str(tmp_path / "data") in message


def test_cifar10_uses_a_tarball_already_in_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, md5 = _fixture_tarball(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(tarball.read_bytes())
    with pytest.raises(DatasetError, match="checksum mismatch"):  # the official md5 differs
        load_cifar10(root, download=False)
    monkeypatch.setattr(cifar10_module, "CIFAR10_TARBALL_MD5", md5)
    assert load_cifar10(root, download=False).train_size == 15


def test_cifar10_corrupt_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    monkeypatch.setattr(cifar10_module, "CIFAR10_TARBALL_MD5", hashlib.md5(b"garbage").hexdigest())
    with pytest.raises(DatasetError, match="cannot extract") as err:
        load_cifar10(tmp_path, download=False)
    _one_line(err)


# ---------------------------------------------------------------- folder


def _write_image(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def test_folder_with_train_and_test_dirs(tmp_path: Path) -> None:
    for split, n in [("train", 3), ("test", 2)]:
        for name, colour in COLOURS.items():
            for i in range(n):
                _write_image(tmp_path / split / name / f"{i}.png", colour)
    _write_image(tmp_path / "train" / "red" / "extra.JPG", (250, 5, 5), size=(40, 40))
    Image.new("L", (9, 9), 128).save(tmp_path / "train" / "green" / "gray.png")
    (tmp_path / "train" / "red" / "notes.txt").write_text("ignored")

    ds = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert ds.class_names == ("blue", "green", "red")
    assert ds.x_train.shape == (11, 3, 16, 16) and ds.x_test.shape == (6, 3, 16, 16)
    assert torch.bincount(ds.y_train).tolist() == [3, 4, 4]
    assert ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    # Standardised with the training set's statistics; the red channel is highest for red.
    mean = torch.tensor(ds.info["mean"]).view(3, 1, 1)
    std = torch.tensor(ds.info["std"]).view(3, 1, 1)
    red_pixel = ds.x_test[ds.y_test == 2][0] * std + mean
    torch.testing.assert_close(red_pixel[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_folder_without_split_dirs_is_split_80_20(tmp_path: Path) -> None:
    for name, colour in COLOURS.items():
        for i in range(10):
            _write_image(tmp_path / name / f"{i}.png", colour)
    ds = load_folder(tmp_path, image_size=8)
    assert ds.train_size == 24 and ds.x_test.shape[0] == 6
    assert torch.bincount(ds.y_test).tolist() == [2, 2, 2]
    again = load_folder(tmp_path, image_size=8)
    assert torch.equal(ds.x_test, again.x_test)
    assert load_dataset(f"folder:{tmp_path}", train_size=9).train_size == 9


def _png_rgb16(path: Path, values: np.ndarray) -> None:
    """Write ``values`` (uint16, (H, W, 3)) as a 16-bit-per-channel RGB PNG (Pillow cannot)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_folder_16bit_images_keep_their_high_byte(tmp_path: Path) -> None:
    # convert("RGB") clips 16-bit values to 255: nearly every pixel turned white.
    rng = np.random.default_rng(0)
    gray = {k: rng.integers(0, 1 << 16, (8, 8), dtype=np.uint16) for k in range(4)}
    rgb = rng.integers(0, 1 << 16, (8, 8, 3), dtype=np.uint16)
    files = {
        ("train", "a", "0.png"): gray[0],  # Pillow mode I;16
        ("train", "b", "0.png"): gray[1],
        ("test", "a", "0.png"): gray[2],
        ("test", "b", "0.png"): rgb,  # Pillow reduces 16-bit RGB itself: the same rule
    }
    for parts, values in files.items():
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if values.ndim == 3:
            _png_rgb16(path, values)
        else:
            Image.fromarray(values).save(path)
    big_endian = tmp_path / "train" / "b" / "1.tif"  # Pillow mode I;16B
    Image.fromarray(gray[3].astype(">u2")).save(big_endian)
    files[("train", "b", "1.tif")] = gray[3]
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode == "I;16"
    assert Image.open(big_endian).mode == "I;16B"

    ds = load_folder(tmp_path, image_size=8, cache=False)
    mean = torch.tensor(ds.info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ds.info["std"]).view(1, 3, 1, 1)

    def expected(*keys: tuple[str, str, str]) -> torch.Tensor:
        high = [files[k] >> 8 for k in keys]
        stack = [v if v.ndim == 3 else np.broadcast_to(v[..., None], (8, 8, 3)) for v in high]
        return torch.from_numpy(np.stack(stack).transpose(0, 3, 1, 2).astype(np.float32) / 255)

    train = [("train", "a", "0.png"), ("train", "b", "0.png"), ("train", "b", "1.tif")]
    test = [("test", "a", "0.png"), ("test", "b", "0.png")]
    torch.testing.assert_close(ds.x_train * std + mean, expected(*train), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x_test * std + mean, expected(*test), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [(np.int32, "I"), (np.float32, "F")],
    ids=["32-bit-integer", "float"],
)
def test_folder_refuses_pixels_of_unknown_range(tmp_path: Path, pixels, mode) -> None:
    for name in ("a", "b"):
        _write_image(tmp_path / name / "0.png", (1, 2, 3))
    odd = tmp_path / "b" / "odd.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=pixels)).save(odd)
    assert Image.open(odd).mode == mode
    with pytest.raises(DatasetError, match=f"image {odd} has .* pixels \\(Pillow mode {mode}\\)"):
        load_folder(tmp_path, cache=False)


def test_folder_errors(tmp_path: Path) -> None:
    cases: list[tuple[str, str]] = []
    cases.append((str(tmp_path / "missing"), "is not a directory"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((str(empty), "no class sub-directories"))
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "readme.txt").write_text("x")
    cases.append((str(no_images), "has no images"))
    one_class = tmp_path / "one_class"
    _write_image(one_class / "cat" / "a.png", (1, 2, 3))
    _write_image(one_class / "cat" / "b.png", (1, 2, 3))
    cases.append((str(one_class), "need at least 2"))
    only_train = tmp_path / "only_train"
    _write_image(only_train / "train" / "cat" / "a.png", (1, 2, 3))
    cases.append((str(only_train), "needs both train/ and test/"))
    stray = tmp_path / "stray"
    for split, name in [("train", "cat"), ("train", "dog"), ("test", "cow")]:
        _write_image(stray / split / name / "a.png", (1, 2, 3))
    cases.append((str(stray), "not in"))
    corrupt = tmp_path / "corrupt"
    _write_image(corrupt / "cat" / "a.png", (1, 2, 3))
    _write_image(corrupt / "dog" / "a.png", (1, 2, 3))
    (corrupt / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    cases.append((str(corrupt), "cannot read image .*broken.png"))
    for path, message in cases:
        with pytest.raises(DatasetError, match=message) as err:
            load_dataset(f"folder:{path}")
        _one_line(err)
    with pytest.raises(DatasetError, match="image_size"):
        load_folder(corrupt, image_size=0)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("spec", ["imagenet", "", "cifar", "mnist1d:x", "folder", "folder:", 3])
def test_unknown_or_malformed_specs(spec: object) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(spec)  # type: ignore[arg-type]
    assert isinstance(err.value, ValueError)
    message = _one_line(err)
    if spec not in ("folder", "folder:"):
        assert all(name in message for name in DATASET_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"train_size": 0}, "train_size"),
        ({"train_size": 10**6}, "train_size"),
    ],
)
def test_bad_load_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset("digits-shifted", **kwargs)
    _one_line(err)


# ---------------------------------------------------------------- folder: tar archives, cache


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test here writes to the user's cache: ``default_cache_dir()`` is a fresh directory."""
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _write_tree(root: Path, layout: str, seed: int = 0) -> None:
    """A few noisy 9x7 JPEGs and PNGs per class, plus files every loader must skip."""
    rng = np.random.default_rng(seed)
    splits = [("train", 4), ("test", 2)] if layout == "train/test" else [("", 5)]
    for split, n in splits:
        for c, name in enumerate(["cat", "dog", "emu"]):
            for i in range(n):
                pixels = rng.integers(0, 64, (7, 9, 3), dtype=np.uint8) + np.uint8(60 * c)
                path = root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
            (root / split / name / "notes.txt").write_text("not an image")
            (root / split / name / "._0.png").write_bytes(b"AppleDouble, hidden")
    (root / "README.md").write_text("top-level files are ignored")


def _tar(src: Path, target: Path, *, wrapper: str | None = None, mode: str = "w:gz") -> Path:
    with tarfile.open(target, mode) as archive:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            archive.add(path, arcname=f"{wrapper}/{rel}" if wrapper else rel, recursive=False)
    return target


def _assert_same(a: Dataset, b: Dataset) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.class_names == b.class_names and a.info["layout"] == b.info["layout"]
    assert a.info["mean"] == b.info["mean"] and a.info["std"] == b.info["std"]


@pytest.mark.parametrize(
    ("layout", "wrapper", "mode", "name"),
    [
        ("train/test", None, "w:gz", "data.tar.gz"),
        ("train/test", "cifar-ish", "w:gz", "data.tgz"),
        ("split", None, "w:", "data.tar"),
        ("split", "wrap", "w:xz", "data.tar.xz"),
        ("train/test", "wrap", "w:bz2", "data.bin"),  # compression is read from the bytes
    ],
)
def test_folder_archive_gives_the_arrays_of_the_extracted_directory(
    tmp_path: Path, layout: str, wrapper: str | None, mode: str, name: str
) -> None:
    _write_tree(tmp_path / "src", layout)
    archive = _tar(tmp_path / "src", tmp_path / name, wrapper=wrapper, mode=mode)
    from_dir = load_folder(tmp_path / "src", image_size=8, cache=False)
    from_tar = load_dataset(f"folder:{archive}", image_size=8)
    _assert_same(from_tar, from_dir)
    assert from_tar.class_names == ("cat", "dog", "emu") and from_tar.info["layout"] == layout
    sizes = (12, 6) if layout == "train/test" else (12, 3)
    assert (from_tar.train_size, from_tar.x_test.shape[0]) == sizes
    assert from_tar.info["source"] == "archive" and not from_tar.info["from_cache"]
    assert from_tar.info["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    # The pixels are the decoded images themselves: undo the standardisation.
    mean = torch.tensor(from_tar.info["mean"]).view(3, 1, 1)
    std = torch.tensor(from_tar.info["std"]).view(3, 1, 1)
    first = "train/cat/0.png" if layout == "train/test" else "cat/0.png"
    with Image.open(tmp_path / "src" / first) as img:
        pixels = np.array(img.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(from_tar.x_train[0] * std + mean, expected)


def test_folder_archive_skips_links_and_outside_names_and_reads_the_later_duplicate(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", "train/test")
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    extra = []
    for name, kind in [("train/cat/link.png", tarfile.SYMTYPE), ("../train/cat/up.png", None)]:
        info = tarfile.TarInfo(name)
        if kind is None:
            info.size = 4
        else:
            info.type, info.linkname = kind, "0.png"
        extra.append((info, b"junk" if kind is None else None))
    # A name stored twice: the later copy is the one extracting would leave.
    again = (tmp_path / "src" / "train" / "dog" / "0.png").read_bytes()
    info = tarfile.TarInfo("./train/cat/0.png")
    info.size = len(again)
    extra.append((info, again))
    (tmp_path / "src" / "train" / "cat" / "0.png").write_bytes(again)
    with tarfile.open(archive, "w:gz") as tar:
        for member, data in [*members, *extra]:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    _assert_same(load_folder(archive), load_folder(tmp_path / "src", cache=False))


def test_folder_archive_layout_errors(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", "train/test")
    (tmp_path / "src" / "test" / "emu").rename(tmp_path / "src" / "test" / "yak")
    with pytest.raises(DatasetError, match=r"classes \['yak'\] in .*data.tar.gz:w/test") as err:
        load_folder(_tar(tmp_path / "src", tmp_path / "data.tar.gz", wrapper="w"))
    _one_line(err)
    # A lone train/ at the top is a train/ without its test/, not a wrapper directory.
    only_train = _tar(tmp_path / "src" / "train", tmp_path / "train.tar", wrapper="train")
    with pytest.raises(DatasetError, match="needs both train/ and test/"):
        load_folder(only_train)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-directories in .*empty.tar"):
        load_folder(_tar(tmp_path / "empty", tmp_path / "empty.tar", mode="w"))


def test_folder_archive_cache_hit_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path / "src", "split")
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz", wrapper="w")
    cache = tmp_path / "cache"
    first = load_dataset(f"folder:{archive}", data_dir=tmp_path / "cache", image_size=8)
    (entry,) = (cache / "folder").iterdir()
    assert first.info["cache_file"] == str(entry) and not first.info["from_cache"]
    assert entry.name.startswith(f"tar-{first.info['sha256'][:16]}-8px-v")

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder_module, "_decode", no_decoding)
    monkeypatch.setattr(folder_module, "list_archive", no_decoding)
    again = load_dataset(f"folder:{archive}", data_dir=tmp_path / "cache", image_size=8)
    _assert_same(again, first)
    assert again.info["from_cache"]
    # The split of a PATH/<class>/* folder is drawn after the cache: other seeds still work.
    other = load_folder(archive, image_size=8, split_seed=1, cache_dir=cache / "folder")
    assert not torch.equal(other.y_test, first.y_test) or not torch.equal(
        other.x_test, first.x_test
    )
    assert sorted(other.y_test.tolist()) == sorted(first.y_test.tolist())
    # ... and are standardised by their own training set, not by the cached statistics.
    with np.load(entry) as f:
        assert str(f["stats_for"]) == "0.2 0" and f["stats"].tolist()[0] == first.info["mean"]
    assert other.info["mean"] != first.info["mean"]
    # Another image size is another entry (and is decoded).
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_folder(archive, image_size=4, cache_dir=cache / "folder")


def test_folder_archive_cache_follows_the_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path / "src", "train/test", seed=0)
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz")
    cache = tmp_path / "cache"
    first = load_folder(archive, image_size=8, cache_dir=cache)
    _write_tree(tmp_path / "src", "train/test", seed=1)  # same names, other pixels
    _tar(tmp_path / "src", archive)
    reference = load_folder(tmp_path / "src", image_size=8, cache=False)
    decoded: list[str] = []
    real_decode = folder_module._decode

    def counting(source: object, size: int, where: str) -> np.ndarray:
        decoded.append(where)
        return real_decode(source, size, where)

    monkeypatch.setattr(folder_module, "_decode", counting)
    second = load_folder(archive, image_size=8, cache_dir=cache)
    assert len(decoded) == 18 and not second.info["from_cache"]
    assert not torch.equal(second.x_train, first.x_train)
    _assert_same(second, reference)
    assert len(list(cache.iterdir())) == 2  # one entry per archive content
    # A damaged cache file is a miss: decoded again and rewritten.
    entry = cache / Path(second.info["cache_file"]).name
    entry.write_bytes(b"not an npz")
    _assert_same(load_folder(archive, image_size=8, cache_dir=cache), second)
    assert len(decoded) == 36 and np.load(entry)["images"].shape == (18, 3, 8, 8)


def test_folder_directory_cache_follows_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path / "src", "split")
    image = tmp_path / "src" / "dog" / "extra.bmp"  # uncompressed: new pixels, same size
    Image.new("RGB", (9, 7), (0, 0, 0)).save(image)
    cache = tmp_path / "cache"
    first = load_folder(tmp_path / "src", image_size=8, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert entry.name.startswith("dir-") and not first.info["from_cache"]
    real_decode = folder_module._decode
    monkeypatch.setattr(folder_module, "_decode", lambda *a: pytest.fail("decoded"))
    again = load_folder(tmp_path / "src", image_size=8, cache_dir=cache)
    _assert_same(again, first)
    assert again.info["from_cache"]
    monkeypatch.setattr(folder_module, "_decode", real_decode)
    # Rewrite one image with other pixels, its size and its old mtime: the ctime gives it away.
    stat = image.stat()
    Image.new("RGB", (9, 7), (255, 255, 255)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    changed = load_folder(tmp_path / "src", image_size=8, cache_dir=cache)
    assert not changed.info["from_cache"]
    _assert_same(changed, load_folder(tmp_path / "src", image_size=8, cache=False))
    every = [torch.cat([d.x_train, d.x_test]) for d in (changed, first)]
    assert not torch.equal(*every)
    assert list(cache.iterdir()) == [entry]  # the directory's entry was replaced


def test_folder_unwritable_cache_warns_and_loads(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", "train/test")
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir's parent should be")
    for source in (archive, tmp_path / "src"):
        for _ in range(2):
            with pytest.warns(UserWarning, match="could not cache the decoded images") as record:
                ds = load_folder(source, image_size=8, cache_dir=blocker / "cache")
            assert len(record) == 1 and "\n" not in str(record[0].message)
            assert not ds.info["from_cache"] and ds.train_size == 12
    assert blocker.read_text().startswith("a file")


def _damaged_archives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    _write_tree(tmp_path / "src", "train/test")
    good = _tar(tmp_path / "src", tmp_path / "good.tar.gz").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    plain = _tar(tmp_path / "src", tmp_path / "good.tar", mode="w:").read_bytes()
    with tarfile.open(tmp_path / "good.tar") as tar:
        header = [m.offset for m in tar.getmembers()][len(tar.getmembers()) // 2]
    bad_header = bytearray(plain)
    bad_header[header + 3] ^= 0x55  # in the member's name: the header checksum fails
    cases = {
        "truncated": (good[: len(good) // 2], "truncated or corrupt near member"),
        "trailer-cut": (good[:-3], "truncated or corrupt .*EOFError"),
        "bit-flip": (bytes(flipped), "truncated or corrupt"),
        "tar-truncated": (plain[: len(plain) // 2 + 100], "truncated or corrupt"),
        "tar-cut-between-members": (plain[:header], "truncated or corrupt after member"),
        "tar-bad-header": (bytes(bad_header), "truncated or corrupt after member"),
        "tar-trailing-data": (plain + b"more" * 200, "something other than padding"),
        "not-a-tar": (b"just some text\n" * 100, "is not a tar archive"),
        "empty": (b"", "is not a tar archive"),
    }
    paths = {}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(data)
        paths[name] = (path, message)
    return paths


def test_folder_damaged_archives_are_one_line_errors(tmp_path: Path) -> None:
    for name, (path, message) in _damaged_archives(tmp_path).items():
        with pytest.raises(DatasetError, match=message) as err:
            load_folder(path, cache_dir=tmp_path / "cache")
        assert str(path) in _one_line(err), name
    assert not (tmp_path / "cache").exists()


def test_folder_corrupt_image_member(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", "train/test")
    (tmp_path / "src" / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz", wrapper="w")
    with pytest.raises(DatasetError, match="cannot read image w/test/dog/broken.jpg in ") as err:
        load_folder(archive, cache_dir=tmp_path / "cache")
    assert str(archive) in _one_line(err)
    assert not list((tmp_path / "cache").glob("*"))
