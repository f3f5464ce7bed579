"""Tests of compresslight.datamodules on data generated in tmp_path (real CIFAR-10 only under -m slow)."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from compresslight.datamodules import (
    CIFAR10DataModule,
    ImageNetDataModule,
    IndexBatchSampler,
    SteelpatchDataModule,
    SyntheticDataModule,
    batch_random_crop,
    batch_random_flip,
    download_cifar10,
    load_cifar10_batches,
    normalize_batch,
    stratified_split,
)
from compresslight.datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from compresslight.datamodules.image_folder import RandomResizedCrop, scan_image_folder
from jsonargparse import ArgumentParser
from PIL import Image
from torch import nn

REAL_CIFAR10 = Path("/work/shared/data/cifar10")
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# ----- generated data ------------------------------------------------------------------------------


def write_fake_cifar10(
    folder: Path, per_batch: int = 40, low: int = 0, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes data_batch_1..5, test_batch and batches.meta in the official pickle format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(low, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(label) for label in labels],
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = (data, labels)
    meta = {b"label_names": LABEL_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return written


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_fake_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    return tmp_path / "cifar10"


def write_image_folder(root: Path, counts: dict[str, int], *, mode: str = "RGB", seed: int = 0) -> None:
    """Class folders of small PNG/JPEG images of varying sizes."""
    rng = np.random.default_rng(seed)
    for class_name, count in counts.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            shape = (height, width, 3) if mode == "RGB" else (height, width)
            image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
            image.save(root / class_name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    write_image_folder(root / "train", {"n01": 4, "n02": 4, "n03": 4})
    write_image_folder(root / "val", {"n01": 2, "n02": 2, "n03": 2}, seed=1)
    return root


@pytest.fixture
def steel_root(tmp_path: Path) -> Path:
    root = tmp_path / "steel"
    write_image_folder(root, {"crazing": 10, "inclusion": 10, "patches": 10, "scratches": 10}, mode="L")
    return root


def manual_crop(image: torch.Tensor, padding: int, row: int, col: int) -> torch.Tensor:
    _, height, width = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    return padded[:, row : row + height, col : col + width]


# ----- batch transforms ----------------------------------------------------------------------------


def test_random_crop_with_given_offsets_matches_manual_pad_and_slice() -> None:
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [4, 4], [8, 8], [0, 8], [8, 0], [3, 5]])
    cropped = batch_random_crop(images, 4, offsets=offsets)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    for image, out, (row, col) in zip(images, cropped, offsets.tolist()):
        assert torch.equal(out, manual_crop(image, 4, row, col))
    assert torch.equal(cropped[1], images[1])  # offset (4, 4) is the uncropped image


def test_random_crop_shows_padding_in_some_images() -> None:
    torch.manual_seed(0)
    white = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    cropped = batch_random_crop(white, 4)
    zeros_per_image = (cropped == 0).flatten(1).sum(1)
    # P(offset (4, 4)) = 1/81 per image: most images show padding, a few do not, none shows > 4 rows.
    assert (zeros_per_image > 0).float().mean() > 0.9
    assert zeros_per_image.max() <= 3 * (32 * 32 - 28 * 28)
    # The padding is black: the image part stays one solid 255 block.
    assert set(cropped.unique().tolist()) == {0, 255}


def test_random_flip_matches_manual_flip() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    mask = torch.tensor([True, False, True, False])
    flipped = batch_random_flip(images, flip_mask=mask)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[2], images[2].flip(-1))
    assert torch.equal(flipped[1], images[1]) and torch.equal(flipped[3], images[3])
    vertical = batch_random_flip(images, dim=-2, flip_mask=mask)
    assert torch.equal(vertical[0], images[0].flip(-2))


def test_random_flip_flips_about_half() -> None:
    torch.manual_seed(0)
    images = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(2000, 1, 1, 4)
    flipped = batch_random_flip(images)
    share = (flipped[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.45 < share < 0.55


def test_normalize_batch_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize_batch(images, mean=[0.2], std=[0.5])
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-0.4, 0.0, 1.6]), atol=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: batch_random_crop(x[0], 4), ValueError, r"shape \(N, C, H, W\)"),
        (lambda x: batch_random_crop(x, -1), ValueError, "`padding` must be >= 0"),
        (lambda x: batch_random_crop(x, 1, offsets=torch.tensor([[0, 3]] * 2)), ValueError, r"\[0, 2\]"),
        (lambda x: batch_random_flip(x, dim=1), ValueError, "`dim` must be -1"),
        (lambda x: batch_random_flip(x, probability=1.5), ValueError, "`probability`"),
        (lambda x: normalize_batch(x.float(), [0.5] * 3, [0.5] * 3), TypeError, "must be uint8"),
        (lambda x: normalize_batch(x, [0.5], [0.5]), ValueError, "one value per channel"),
    ],
)
def test_batch_transform_errors(call, error, match) -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(error, match=match):
        call(images)


def test_index_batch_sampler_covers_all_and_reshuffles() -> None:
    sampler = IndexBatchSampler(10, 4, shuffle=True, drop_last=False, seed=3)
    assert len(sampler) == 3
    first = torch.cat(list(sampler))
    second = torch.cat(list(sampler))
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    sampler.set_epoch(0)
    assert torch.equal(torch.cat(list(sampler)), first)  # the order is a function of (seed, epoch)
    dropping = IndexBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert [b.tolist() for b in dropping] == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(dropping) == 2


# ----- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar_loads_official_layout(tmp_path: Path) -> None:
    written = write_fake_cifar10(tmp_path / "cifar-10-batches-py", per_batch=20)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=16)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)  # before setup, for the CLI link
    dm.setup("fit")
    assert dm.train_images.shape == (100, 3, 32, 32) and dm.train_images.dtype == torch.uint8
    assert dm.train_labels.dtype == torch.int64 and dm.train_labels.shape == (100,)
    data, labels = written["data_batch_2"]
    # Row i of a batch: 1024 red, 1024 green, 1024 blue values, each row-major.
    assert torch.equal(dm.train_images[20, 1], torch.from_numpy(data[0, 1024:2048].reshape(32, 32)))
    assert torch.equal(dm.train_labels[20:40], torch.from_numpy(labels))
    assert dm.test_images.shape == (20, 3, 32, 32)
    images, batch_labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
    assert batch_labels.dtype == torch.int64 and 0 <= batch_labels.min() and batch_labels.max() <= 9


def test_cifar_data_dir_may_be_the_batches_folder(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root / "cifar-10-batches-py"))
    dm.setup("test")
    assert dm.test_images.shape == (40, 3, 32, 32)
    assert dm.train_images is None  # testing loads the test batch only


def test_cifar_eval_transform_is_deterministic_normalization(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root))
    dm.setup("test")
    images = dm.test_images[:8]
    first, second = dm.transform_batch(images, train=False), dm.transform_batch(images, train=False)
    assert torch.equal(first, second) and first.dtype == torch.float32
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(first, (images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(images, dm.test_images[:8])  # the stored data is never modified


def test_cifar_train_transform_is_padded_crop_then_flip_then_normalize(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root))
    dm.setup("fit")
    images = dm.train_images[:24]
    torch.manual_seed(1)
    out = dm.transform_batch(images, train=True)
    assert out.shape == (24, 3, 32, 32) and out.dtype == torch.float32
    shifted = flipped = 0
    for image, result in zip(images, out):
        matches = [
            (row, col, flip)
            for row in range(9)
            for col in range(9)
            for flip in (False, True)
            if torch.allclose(
                dm.transform_batch(
                    manual_crop(image, 4, row, col).flip(-1)[None] if flip else manual_crop(image, 4, row, col)[None],
                    train=False,
                )[0],
                result,
                atol=1e-5,
            )
        ]
        assert len(matches) == 1, "every output is exactly one crop/flip of its input"
        row, col, flip = matches[0]
        shifted += (row, col) != (4, 4)
        flipped += flip
    assert shifted >= 20 and 4 <= flipped <= 20
    no_augment = CIFAR10DataModule(data_dir=str(cifar_root), augment=False)
    assert torch.equal(no_augment.transform_batch(images, train=True), dm.transform_batch(images, train=False))


@pytest.mark.parametrize(("val_split", "expected"), [(50, 50), (0.1, 20)])
def test_cifar_val_split_is_seeded_and_disjoint(cifar_root: Path, val_split: int | float, expected: int) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root), val_split=val_split, seed=7)
    dm.setup("fit")
    assert len(dm.val_labels) == expected and len(dm.train_labels) == 200 - expected
    assert set(dm.train_index.tolist()).isdisjoint(dm.val_index.tolist())
    assert sorted(dm.train_index.tolist() + dm.val_index.tolist()) == list(range(200))
    full, _ = load_cifar10_batches(cifar_root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)])
    assert torch.equal(dm.val_images, full[dm.val_index])
    same = CIFAR10DataModule(data_dir=str(cifar_root), val_split=val_split, seed=7)
    same.setup("fit")
    assert torch.equal(same.val_index, dm.val_index)
    other = CIFAR10DataModule(data_dir=str(cifar_root), val_split=val_split, seed=8)
    other.setup("fit")
    assert not torch.equal(other.val_index, dm.val_index)
    assert next(iter(dm.val_dataloader()))[0].shape[0] == min(expected, 128)


def test_cifar_without_val_split_validates_on_test(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root))
    dm.setup("fit")
    assert dm.val_images is dm.test_images and len(dm.train_labels) == 200


def test_cifar_val_split_larger_than_train_raises(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar_root), val_split=500)
    with pytest.raises(ValueError, match=r"`val_split` must be a count in \[0, 200\)"):
        dm.setup("fit")
    tiny = CIFAR10DataModule(data_dir=str(cifar_root), val_split=0.001)
    with pytest.raises(ValueError, match="`val_split` 0.001 of 200 training images holds out none"):
        tiny.setup("fit")


def test_cifar_missing_folder_says_where_and_how(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/cifar-10-batches-py.*download=True"):
        dm.setup("fit")


def test_cifar_missing_batch_file_is_named(cifar_root: Path) -> None:
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_3'\]"):
        CIFAR10DataModule(data_dir=str(cifar_root)).setup("fit")


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({b"data": os.getcwd}, file, protocol=2)  # a global outside the allow-list
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd.*refused"):
        load_cifar10_batches(folder, ["test_batch"])


def test_cifar_rejects_wrong_shaped_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, file, protocol=2)
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        load_cifar10_batches(folder, ["test_batch"])


def unused_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cifar_download_failure_says_where_to_put_files(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_local_port()}/cifar-10-python.tar.gz"  # nothing listens there
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "c10"), download=True, download_url=url)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"Could not download CIFAR-10.*c10/cifar-10-batches-py.*data_batch_1"):
        dm.prepare_data()
    assert time.perf_counter() - start < 5
    assert not list((tmp_path / "c10").glob("*.part"))


def test_cifar_download_checks_md5_and_extracts(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_fake_cifar10(source / "cifar-10-batches-py", per_batch=10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    url = archive.as_uri()
    bad = CIFAR10DataModule(data_dir=str(tmp_path / "bad"), download=True, download_url=url)
    with pytest.raises(RuntimeError, match="Checksum mismatch.*expected c58f30108f718f92721af3b95e74349a"):
        bad.prepare_data()  # a file that is not the official archive
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    folder = download_cifar10(tmp_path / "good" / "cifar-10-batches-py", url=url, md5=md5)
    images, labels = load_cifar10_batches(folder, ["test_batch"])
    assert images.shape == (10, 3, 32, 32) and labels.shape == (10,)
    assert not (tmp_path / "good" / "cifar-10-python.tar.gz").exists()


# ----- ImageNet ------------------------------------------------------------------------------------


def test_imagenet_shapes_and_classes(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(
        data_dir=str(imagenet_root), batch_size=4, num_workers=0, image_size=16, eval_resize_size=20
    )
    assert dm.num_classes == 3 and dm.input_shape == (3, 16, 16)
    dm.setup("fit")
    assert dm.classes == ["n01", "n02", "n03"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert sorted(dm.val_dataset.index.targets.tolist()) == [0, 0, 1, 1, 2, 2]
    val_first = torch.cat([batch[0] for batch in dm.val_dataloader()])
    val_second = torch.cat([batch[0] for batch in dm.val_dataloader()])
    assert val_first.shape == (6, 3, 16, 16) and torch.equal(val_first, val_second)
    normalized = dm.transform_batch(val_first, train=False)
    assert normalized.dtype == torch.float32 and -2.2 < normalized.min() and normalized.max() < 2.7


def test_imagenet_eval_is_resize_then_center_crop(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(imagenet_root), num_workers=0, image_size=16, eval_resize_size=20)
    dm.setup("validate")
    path = dm.val_dataset.index.path(0)
    with Image.open(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    short = min(width, height)
    resized = image.resize((int(20 * width / short), int(20 * height / short)), Image.Resampling.BILINEAR)
    left, top = round((resized.width - 16) / 2), round((resized.height - 16) / 2)
    expected = np.asarray(resized.crop((left, top, left + 16, top + 16))).transpose(2, 0, 1)
    assert torch.equal(dm.val_dataset[0][0], torch.from_numpy(expected.copy()))


def test_imagenet_loads_in_worker_processes(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(imagenet_root), batch_size=6, num_workers=1, image_size=16)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    batches = list(loader)  # a whole epoch: a half-read one makes worker shutdown wait
    assert [tuple(images.shape) for images, _ in batches] == [(6, 3, 16, 16)] * 2
    del loader  # shut the worker down here, not in a later test


def test_random_resized_crop_box_stays_inside_the_image() -> None:
    torch.manual_seed(0)
    crop = RandomResizedCrop(16, scale=(0.08, 1.0))
    for width, height in [(40, 30), (100, 20), (17, 90)]:
        for _ in range(50):
            left, top, crop_w, crop_h = crop.crop_box(width, height)
            assert 0 <= left and left + crop_w <= width and 0 <= top and top + crop_h <= height
            assert crop_w > 0 and crop_h > 0
    image = Image.new("RGB", (40, 30))
    assert crop(image).size == (16, 16)


def test_imagenet_missing_folder_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no image folder at .*nothing/train.*ImageFolder layout"):
        ImageNetDataModule(data_dir=str(tmp_path / "nothing"))
    dm = ImageNetDataModule(data_dir=str(tmp_path / "nothing"), num_classes=1000)  # data may come later
    assert dm.num_classes == 1000
    with pytest.raises(FileNotFoundError, match="nothing/train"):
        dm.setup("fit")


def test_imagenet_num_classes_checked_against_folders(imagenet_root: Path) -> None:
    dm = ImageNetDataModule(data_dir=str(imagenet_root), num_classes=1000, num_workers=0)
    with pytest.raises(ValueError, match="`num_classes` is 1000 but .* has 3 class folders"):
        dm.setup("fit")


def test_imagenet_val_class_unknown_to_train_raises(imagenet_root: Path) -> None:
    write_image_folder(imagenet_root / "val", {"n99": 1})
    dm = ImageNetDataModule(data_dir=str(imagenet_root), num_workers=0)
    with pytest.raises(ValueError, match=r"class folders that the training classes lack: \['n99'\]"):
        dm.setup("fit")


def test_empty_class_folder_raises(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 1})
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="train/b' holds no image"):
        scan_image_folder(tmp_path / "train")


# ----- Steelpatch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_steelpatch_channels(steel_root: Path, channels: int) -> None:
    dm = SteelpatchDataModule(data_dir=str(steel_root), image_size=24, channels=channels, batch_size=8, num_workers=0)
    assert dm.num_classes == 4 and dm.input_shape == (channels, 24, 24)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, channels, 24, 24) and images.dtype == torch.uint8
    if channels == 3:
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    model_input = dm.transform_batch(images, train=False)
    assert model_input.shape == (8, channels, 24, 24)
    assert torch.allclose(model_input, (images.float() / 255 - 0.5) / 0.5, atol=1e-6)


def test_steelpatch_stratified_split(steel_root: Path) -> None:
    dm = SteelpatchDataModule(data_dir=str(steel_root), val_fraction=0.2, test_fraction=0.2, num_workers=0)
    dm.setup(None)
    splits = {name: getattr(dm, f"{name}_dataset").index for name in ("train", "val", "test")}
    for name, index in splits.items():
        counts = np.bincount(index.targets, minlength=4)
        assert counts.tolist() == ([6] * 4 if name == "train" else [2] * 4), name
    paths = [set(index.paths.tolist()) for index in splits.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(paths) for b in paths[i + 1 :])
    again = SteelpatchDataModule(data_dir=str(steel_root), val_fraction=0.2, test_fraction=0.2, num_workers=0)
    again.setup("test")
    assert again.test_dataset.index.paths.tolist() == splits["test"].paths.tolist()
    other = SteelpatchDataModule(data_dir=str(steel_root), val_fraction=0.2, test_fraction=0.2, num_workers=0, seed=1)
    other.setup("test")
    assert other.test_dataset.index.paths.tolist() != splits["test"].paths.tolist()


def test_stratified_split_keeps_rare_classes_in_every_split() -> None:
    targets = np.array([0] * 100 + [1] * 3)
    train, val, test = stratified_split(targets, (0.1, 0.1), seed=0)
    for part in (train, val, test):
        assert set(targets[part].tolist()) == {0, 1}
    assert len(train) + len(val) + len(test) == 103
    with pytest.raises(ValueError, match="Class 1 has 2 images: too few"):
        stratified_split(np.array([0] * 10 + [1] * 2), (0.1, 0.1), seed=0)


def test_steelpatch_uses_presplit_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"a": 3, "b": 3}, mode="L")
    write_image_folder(tmp_path / "val", {"a": 1, "b": 1}, mode="L", seed=1)
    dm = SteelpatchDataModule(data_dir=str(tmp_path), image_size=8, num_workers=0)
    dm.setup(None)
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 2
    assert dm.test_dataset.index is dm.val_dataset.index  # no test/: testing uses val/


def test_steelpatch_augmentation_flips_both_ways(steel_root: Path) -> None:
    dm = SteelpatchDataModule(data_dir=str(steel_root), num_workers=0)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8)
    augmented = dm.augment_batch(images)
    seen = set()
    for image, out in zip(images, augmented):
        candidates = {"none": image, "h": image.flip(-1), "v": image.flip(-2), "hv": image.flip(-1).flip(-2)}
        kinds = [kind for kind, candidate in candidates.items() if torch.equal(out, candidate)]
        assert len(kinds) == 1
        seen.add(kinds[0])
    assert seen == {"none", "h", "v", "hv"}


def test_steelpatch_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no image folder at .*absent.*data_dir/<class>/<image>"):
        SteelpatchDataModule(data_dir=str(tmp_path / "absent"))


# ----- synthetic -----------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    dm = SyntheticDataModule(num_classes=5, input_shape=(2, 6, 4), num_samples=40, batch_size=16)
    assert dm.num_classes == 5 and dm.input_shape == (2, 6, 4)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 2, 6, 4) and images.dtype == torch.float32
    assert labels.max() < 5
    twin = SyntheticDataModule(num_classes=5, input_shape=(2, 6, 4), num_samples=40, batch_size=16)
    twin.setup("fit")
    assert torch.equal(twin.train_images, dm.train_images) and torch.equal(twin.val_labels, dm.val_labels)
    assert dm.transform_batch(images, train=True) is images


@pytest.mark.parametrize(("learnable", "above_chance"), [(True, True), (False, False)])
def test_synthetic_learnable_labels(learnable: bool, above_chance: bool) -> None:
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_classes=4, input_shape=(1, 4, 4), num_samples=256, learnable=learnable)
    dm.setup("fit")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        for images, labels in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(dm.val_images).argmax(1) == dm.val_labels).float().mean().item()
    assert (accuracy > 0.6) == above_chance


# ----- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: CIFAR10DataModule(d, batch_size=0), "`batch_size` must be an int >= 1, got 0"),
        (lambda d: CIFAR10DataModule(d, eval_batch_size=-2), "`eval_batch_size` must be an int >= 1"),
        (lambda d: CIFAR10DataModule(d, num_workers=-1), "`num_workers` must be an int >= 0"),
        (lambda d: CIFAR10DataModule(d, val_split=-5), r"`val_split` must be a count in \[0, 50000\)"),
        (lambda d: CIFAR10DataModule(d, val_split=1.0), r"`val_split` must be a fraction in \[0, 1\)"),
        (lambda d: CIFAR10DataModule(d, val_split=True), "`val_split` must be an int count or a float"),
        (lambda d: CIFAR10DataModule(d, crop_padding=-1), "`crop_padding` must be an int >= 0"),
        (lambda d: ImageNetDataModule(d, num_classes=10, image_size=0), "`image_size` must be an int >= 1"),
        (lambda d: ImageNetDataModule(d, num_classes=10, min_scale=0.0), r"`min_scale` must be in \(0, 1\]"),
        (lambda d: ImageNetDataModule(d, num_classes=0), "`num_classes` must be an int >= 1"),
        (
            lambda d: ImageNetDataModule(d, num_classes=10, image_size=224, eval_resize_size=200),
            "`eval_resize_size` must be an int >= 224",
        ),
        (lambda d: SteelpatchDataModule(d, num_classes=6, channels=2), "`channels` must be 1 or 3, got 2"),
        (
            lambda d: SteelpatchDataModule(d, num_classes=6, val_fraction=1.0),
            r"`val_fraction` must be a fraction in \[0, 1\)",
        ),
        (
            lambda d: SteelpatchDataModule(d, num_classes=6, val_fraction=0.6, test_fraction=0.4),
            "`val_fraction` \\+ `test_fraction` must be < 1",
        ),
        (lambda d: SteelpatchDataModule(d, num_classes=6, val_fraction=0.0, test_fraction=0.0), "both 0"),
        (lambda d: SteelpatchDataModule(d, num_classes=6, std=0.0), "`std` must be > 0"),
        (lambda d: SyntheticDataModule(input_shape=(3, 32)), r"`input_shape` must be three positive ints"),
        (lambda d: SyntheticDataModule(num_classes=0), "`num_classes` must be an int >= 1"),
    ],
)
def test_constructor_arguments_are_validated(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(str(tmp_path))


def test_datamodules_build_from_yaml_like_config(cifar_root: Path, steel_root: Path) -> None:
    """jsonargparse (LightningCLI) builds them from plain values; num_classes is there for the link."""
    configs = {
        CIFAR10DataModule: {"data_dir": str(cifar_root), "val_split": 0.1, "batch_size": 64},
        SteelpatchDataModule: {"data_dir": str(steel_root), "channels": 3, "image_size": 32},
        SyntheticDataModule: {"num_classes": 7, "input_shape": [1, 8, 8]},
    }
    for cls, values in configs.items():
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        data = parser.instantiate(parser.parse_object({"data": values})).data
        assert isinstance(data, cls) and isinstance(data.num_classes, int)
        assert isinstance(data.input_shape, tuple) and len(data.input_shape) == 3
    assert data.num_classes == 7 and data.input_shape == (1, 8, 8)


# ----- inside a Trainer ----------------------------------------------------------------------------


class BatchRecorder(pl.LightningModule):
    """A linear classifier that keeps the inputs it was given."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
        self.train_inputs: list[torch.Tensor] = []
        self.val_inputs: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.train_inputs.append(images.detach().clone())
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_inputs.append(batch[0].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_trainer(tmp_path: Path, logger: bool = False) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        # A logger makes Lightning check that model and datamodule hparams agree on shared keys.
        logger=pl.loggers.CSVLogger(tmp_path) if logger else False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )


def test_cifar_in_trainer_augments_training_batches_only(tmp_path: Path) -> None:
    # Pixels >= 128: the normalized value of a 0 pixel can only come from crop padding.
    write_fake_cifar10(tmp_path / "cifar-10-batches-py", per_batch=40, low=128)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=32)
    model = BatchRecorder(dm.input_shape, dm.num_classes)
    tiny_trainer(tmp_path).fit(model, datamodule=dm)
    padding_value = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(1, 3, 1, 1)
    assert len(model.train_inputs) == 2 and len(model.val_inputs) == 2  # sanity check + epoch
    for images in model.train_inputs:
        assert images.dtype == torch.float32 and images.shape == (32, 3, 32, 32)
        assert torch.isclose(images, padding_value, atol=1e-5).any()
    for images in model.val_inputs:
        assert images.dtype == torch.float32
        assert not torch.isclose(images, padding_value, atol=1e-5).any()


def test_steelpatch_in_trainer(steel_root: Path, tmp_path: Path) -> None:
    dm = SteelpatchDataModule(data_dir=str(steel_root), image_size=16, channels=3, batch_size=8, num_workers=0)
    model = BatchRecorder(dm.input_shape, dm.num_classes)
    tiny_trainer(tmp_path, logger=True).fit(model, datamodule=dm)
    assert [tuple(x.shape) for x in model.train_inputs] == [(8, 3, 16, 16)] * 2
    assert all(x.dtype == torch.float32 for x in model.train_inputs + model.val_inputs)


def test_synthetic_in_trainer_with_logger(tmp_path: Path) -> None:
    dm = SyntheticDataModule(num_classes=3, input_shape=(1, 4, 4), num_samples=32, batch_size=8)
    # A model recording `input_shape` as YAML (and ImageClassifier) do, as a list: Lightning
    # refuses to log hyperparameters the model and the datamodule both hold with different values.
    model = BatchRecorder([1, 4, 4], dm.num_classes)
    tiny_trainer(tmp_path, logger=True).fit(model, datamodule=dm)
    assert [tuple(x.shape) for x in model.train_inputs] == [(8, 1, 4, 4)] * 2


def test_index_batches_deal_out_disjointly_under_ddp() -> None:
    """Under DDP Lightning wraps the batch sampler; every rank must see its own batches."""
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    seen: dict[int, list[list[int]]] = {}
    for rank in (0, 1):
        sampler = IndexBatchSampler(40, 4, shuffle=True, drop_last=False, seed=5)
        wrapper = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
        seen[rank] = [torch.cat(list(wrapper)).tolist() for _ in range(2)]  # two epochs
    for epoch in (0, 1):
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(40))
    assert seen[0][0] != seen[0][1]


# ----- real data -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10() -> None:
    if not (REAL_CIFAR10 / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not at {REAL_CIFAR10}")
    dm = CIFAR10DataModule(data_dir=str(REAL_CIFAR10), val_split=5000)
    dm.setup(None)
    assert len(dm.train_labels) + len(dm.val_labels) == 50_000 and len(dm.val_labels) == 5000
    assert len(dm.test_labels) == 10_000
    for labels in (dm.train_labels, dm.val_labels, dm.test_labels):
        assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(dm.test_labels).tolist() == [1000] * 10
    full = torch.cat([dm.train_labels, dm.val_labels])
    assert torch.bincount(full).tolist() == [5000] * 10
    mean = torch.cat([dm.train_images, dm.val_images]).float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=2e-3)
