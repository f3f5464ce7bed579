"""Bad data files are named: a truncated CIFAR-10 batch, truncated or corrupt images (found at
`setup`, every one of them, before training; or skipped with a warning), an image that fails in a
loader, and a folder with one class."""

import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from compresslight.datamodules import CIFAR10DataModule, ImageNetDataModule, SteelpatchDataModule
from compresslight.datamodules.image_folder import check_image_file
from helpers import tiny_trainer
from PIL import Image
from test_datamodules import write_fake_cifar10, write_image_folder

from compresslight.classifier import ImageClassifier


def test_truncated_cifar_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar10(folder)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'.*data_batch_3' is not a readable CIFAR-10 batch: truncated or corrupt"):
        datamodule.setup("fit")


def cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def png_with_corrupt_pixels(path: Path) -> None:
    """A PNG whose compressed pixels are garbage behind a valid checksum: only a decode notices."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    payload = bytes(b ^ 0x5A for b in data[start + 8 : start + 8 + length])
    data[start + 8 : start + 8 + length] = payload
    data[start + 8 + length : start + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + payload))
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged_root(tmp_path):
    """ImageNet-style folders (even files JPEG, odd PNG) with four damaged training files."""
    root = tmp_path / "imagenet"
    write_image_folder(root / "train", {"n01": 6, "n02": 6})
    write_image_folder(root / "val", {"n01": 2, "n02": 2}, seed=1)
    cut(root / "train" / "n01" / "000.jpg", 0.6)  # a JPEG cut off mid-way
    cut(root / "train" / "n01" / "001.png", 0.6)
    (root / "train" / "n02" / "002.jpg").write_bytes(b"")  # an empty file
    (root / "train" / "n02" / "004.jpg").write_text("<html>403 Forbidden</html>")  # a failed download
    png_with_corrupt_pixels(root / "train" / "n02" / "003.png")
    return root


HEADER_BAD = ["n01/000.jpg", "n01/001.png", "n02/002.jpg", "n02/004.jpg"]


def datamodule(root, **kwargs):
    return ImageNetDataModule(data_dir=str(root), batch_size=4, num_workers=0, image_size=16, **kwargs)


def test_setup_names_every_bad_file_before_training(damaged_root):
    with pytest.raises(ValueError) as raised:
        datamodule(damaged_root).setup("fit")
    message = str(raised.value)
    assert message.startswith("ImageNetDataModule: 4 of the 12 image files of the train split in")
    assert "not readable images (check_files='header')" in message
    named = sorted(set(re.findall(r"'([^']+\.(?:jpg|png))'", message)))
    assert [str(Path(path).relative_to(damaged_root / "train")) for path in named] == HEADER_BAD
    assert "skip_bad_files=True" in message


def test_full_decode_also_finds_damage_the_header_check_cannot_see(damaged_root):
    corrupt = str(damaged_root / "train" / "n02" / "003.png")
    assert check_image_file(corrupt) is None
    assert check_image_file(corrupt, decode=True) == "OSError: broken data stream when reading image file"
    with pytest.raises(ValueError, match=r"5 of the 12 image files .*check_files='decode'.*003\.png"):
        datamodule(damaged_root, check_files="decode").setup("fit")


def test_skip_bad_files_warns_and_trains_without_them(damaged_root, tmp_path, caplog):
    dm = datamodule(damaged_root, check_files="decode", skip_bad_files=True)
    dm.setup("fit")
    assert len(dm.train_dataset) == 12 - 5 and len(dm.val_dataset) == 4
    warning = "\n".join(record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert "skipping 5 of the 12 image files of the train split" in warning
    assert all(name.split("/")[1] in warning for name in [*HEADER_BAD, "n02/003.png"])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(ImageClassifier(arch=model, num_classes=2, input_shape=(3, 16, 16)), datamodule=dm)
    assert trainer.global_step == 2  # ceil(7 / 4) batches, none failed


def test_an_image_that_fails_in_a_loader_is_named(damaged_root):
    dm = datamodule(damaged_root, check_files="none", augment=False, shuffle=False)
    dm.setup("fit")
    with pytest.raises(OSError, match=r"Could not decode image '.*n01/000\.jpg' \(OSError: image file is truncated"):
        list(dm.train_dataloader())


def test_good_jpeg_with_data_after_its_end_passes(tmp_path):
    image = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    image.write_bytes(image.read_bytes() + bytes(4096))  # e.g. a motion photo's appended video
    assert check_image_file(str(image)) is None


def test_one_class_folder_is_refused_naming_data_dir(tmp_path):
    write_image_folder(tmp_path / "steel" / "scratches", {"": 4}, mode="L")
    with pytest.raises(
        ValueError, match=r"SteelpatchDataModule: data_dir='.*steel' has one class folder \('scratches'\)"
    ):
        SteelpatchDataModule(data_dir=str(tmp_path / "steel"), num_workers=0)
    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 2})
    write_image_folder(tmp_path / "imagenet" / "val", {"n01": 1})
    with pytest.raises(ValueError, match=r"ImageNetDataModule: data_dir='.*imagenet' has one class folder \('n01'\)"):
        datamodule(tmp_path / "imagenet")
    given = datamodule(tmp_path / "imagenet", num_classes=2)  # built before its data arrives: setup checks
    with pytest.raises(ValueError, match="has one class folder"):
        given.setup("fit")
