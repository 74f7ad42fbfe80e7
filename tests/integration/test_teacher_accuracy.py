"""The ResNet-20 teacher scores 81.03% top-1 on the full JPEG CIFAR-10 test set (pipelines/demo_data/README.md).

A full-data check: the 10,000-image test tar is not in the repository; it is read from ../shared beside it
(data/cifar10-jpeg/test.tar) and the test is skipped, saying so, where that is absent.
"""

import tarfile
from pathlib import Path

import pytest
import torch
from torchvision import datasets, transforms

from pcpp import models

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "pipelines" / "demo_data" / "resnet20-cifar10.th"
TEST_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar"  # full data: beside the repository


@pytest.fixture
def two_threads():
    # The budget is ~60 s on 2 CPU cores; restore the setting so later tests are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not TEST_TAR.is_file(), reason=f"full-data check: needs the 10,000-image JPEG CIFAR-10 test "
                    f"tar at {TEST_TAR} (../shared beside the repository), absent here")
def test_teacher_top1_on_jpeg_test_set(tmp_path, two_threads):
    assert TEACHER.is_file(), f"teacher checkpoint missing: {TEACHER}"
    with tarfile.open(TEST_TAR) as tar:
        tar.extractall(tmp_path, filter="data")

    norm = models.normalization("resnet20")
    dataset = datasets.ImageFolder(
        tmp_path / "test", transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(*norm)])
    )
    assert len(dataset) == 10_000 and len(dataset.classes) == 10
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, shuffle=False, num_workers=0)

    model = models.create("resnet20", pretrained_file=TEACHER).eval()
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
    top1 = 100.0 * correct / len(dataset)
    print(f"ResNet-20 teacher top-1 on cifar10-jpeg/test.tar: {top1:.2f}%")
    assert top1 == pytest.approx(81.0, abs=0.3)
