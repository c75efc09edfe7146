"""The classification arm: the PyTorch examples' MNIST CNN, Adadelta at lr 1.0, every strategy.

Data: MNIST when `--data` holds its idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz); otherwise scikit-learn's
bundled 8 x 8 digits (offline, 1797 images), upsampled bilinearly to 28 x 28 so that the network is
the examples' one unchanged (its fc1 expects 64 x 12 x 12 = 9216 features), with a seeded 80/20
split. Images are standardised with the training set's mean and standard deviation.

The trace keeps the registration arms' columns: ``loss_image`` holds the negative log-likelihood
(the data term) and ``loss_regularisation`` is 0.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from dynomp.learning.config import TrainingConfig
from dynomp.learning.strategies import Strategy
from dynomp.precision.dispatch import single_precision_accumulation, widen, widened_call

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistNet(nn.Module):
    """The CNN of pytorch/examples mnist/main.py: two convolutions, max-pool, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the ten classes for (B, 1, 28, 28) images."""
        features = functional.relu(self.conv1(images))
        features = functional.max_pool2d(functional.relu(self.conv2(features)), 2)
        features = torch.flatten(self.dropout1(features), 1)
        features = self.dropout2(functional.relu(self.fc1(features)))
        return functional.log_softmax(self.fc2(features), dim=1)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped; a ValueError names a malformed file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        content = handle.read()
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dimensions = content[3]
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    dtype = np.dtype(IDX_TYPES[content[2]])
    expected = 4 + 4 * dimensions + int(np.prod(shape)) * dtype.itemsize
    if len(content) != expected:
        raise ValueError(f"{path}: truncated IDX file ({len(content)} bytes, expected {expected})")
    return np.frombuffer(content, dtype=dtype, offset=4 + 4 * dimensions).reshape(shape)


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory / name}: MNIST file not found (plain or .gz)")


def load_mnist(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images in [0, 1], train labels, test images, test labels) from MNIST's idx files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: MNIST directory not found")
    arrays = {key: read_idx(_find(directory, name)) for key, name in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} do not match labels {labels.shape}"
            )
    return (
        arrays["train_images"].astype(np.float32) / 255.0,
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"].astype(np.float32) / 255.0,
        arrays["test_labels"].astype(np.int64),
    )


def load_digits_28(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8 x 8 digits upsampled to 28 x 28 in [0, 1], split 80/20 by `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    images = images[:, 0].clamp(0, 1).numpy()
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test_count = len(labels) // 5
    test, train = order[:test_count], order[test_count:]
    return images[train], labels[train], images[test], labels[test]


class ClassificationTask:
    """Builds the CNN and Adadelta, draws seeded batches, computes the NLL of a step."""

    def __init__(self, config: TrainingConfig, data: str | Path | None) -> None:
        self.config = config
        if data is None:
            train_images, self.train_labels, test_images, self.test_labels = load_digits_28(
                config.seed
            )
        else:
            train_images, self.train_labels, test_images, self.test_labels = load_mnist(data)
        mean, deviation = float(train_images.mean()), float(train_images.std())
        self.train_images = ((train_images - mean) / deviation)[:, None].astype(np.float32)
        self.test_images = ((test_images - mean) / deviation)[:, None].astype(np.float32)
        if config.batch_size > len(self.train_labels):
            raise ValueError(
                f"batch_size: {config.batch_size} exceeds the "
                f"{len(self.train_labels)} training images"
            )

    def build_model(self) -> torch.nn.Module:
        """The examples' MNIST CNN."""
        return MnistNet()

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Adadelta at the configured learning rate (1.0 in the examples and the paper)."""
        return torch.optim.Adadelta(model.parameters(), lr=self.config.learning_rate)

    def output_layer(self, model: torch.nn.Module) -> torch.nn.Module:
        """The last linear layer, whose output dtype shows what the network computed in."""
        return model.fc2

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of `step`, drawn without replacement from (seed, step)."""
        rng = np.random.default_rng([self.config.seed, step])
        chosen = rng.choice(len(self.train_labels), size=self.config.batch_size, replace=False)
        return torch.from_numpy(self.train_images[chosen]), torch.from_numpy(
            self.train_labels[chosen]
        )

    def losses(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], strategy: Strategy
    ) -> dict[str, torch.Tensor]:
        """The negative log-likelihood, reduced in float32."""
        model.train()
        images, labels = batch
        log_probabilities = model(strategy.cast_input(images))
        labels = labels.to(strategy.device)
        # float32 both ways, also under an emulated 16-bit format (see RegistrationTask.losses)
        loss = widened_call(lambda values: functional.nll_loss(values, labels), log_probabilities)
        return {"total": loss, "image": loss, "regularisation": torch.zeros((), device=loss.device)}

    def final_metrics(self, model: torch.nn.Module, strategy: Strategy) -> dict[str, float]:
        """Held-out accuracy and mean NLL, computed in the arm's precision."""
        model.eval()
        correct, total_loss = 0, 0.0
        with torch.no_grad(), strategy.forward_context():
            for start in range(0, len(self.test_labels), 1000):
                images = torch.from_numpy(self.test_images[start : start + 1000])
                labels = torch.from_numpy(self.test_labels[start : start + 1000]).to(
                    strategy.device
                )
                log_probabilities = model(strategy.cast_input(images))
                with single_precision_accumulation():  # the sum unrounded, as in float32 natively
                    log_probabilities = widen(log_probabilities)
                    total_loss += float(functional.nll_loss(log_probabilities, labels, reduction="sum"))
                correct += int((log_probabilities.argmax(dim=1) == labels).sum())
        model.train()
        count = len(self.test_labels)
        return {"held_out_accuracy": correct / count, "held_out_loss": total_loss / count}
