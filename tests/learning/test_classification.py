"""The classification arm: the examples' CNN on the embedded digits and on MNIST idx files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dynomp.learning.classification import load_digits_28, load_mnist, read_idx
from dynomp.learning.config import load_config
from dynomp.learning.train import TRACE_COLUMNS, train


def _write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)


@pytest.fixture
def mnist_directory(tmp_path: Path) -> Path:
    """A tiny MNIST in idx files: class k is a bright bar in row band k."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 20)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 30, size=(count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label + 3 : 2 * label + 6, 4:24] = 255
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress=split == "train")
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
    return tmp_path


def test_mnist_reader(mnist_directory: Path) -> None:
    train_images, train_labels, test_images, test_labels = load_mnist(mnist_directory)
    assert train_images.shape == (40, 28, 28) and test_images.shape == (20, 28, 28)
    assert train_images.max() == 1.0 and list(test_labels[:3]) == [0, 1, 2]
    truncated = mnist_directory / "t10k-labels-idx1-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: truncated IDX file"):
        read_idx(truncated)
    with pytest.raises(FileNotFoundError, match="MNIST file not found"):
        load_mnist(mnist_directory / "..")


def test_digits_are_upsampled_and_split() -> None:
    train_images, train_labels, test_images, test_labels = load_digits_28(seed=0)
    assert train_images.shape[1:] == (28, 28) and len(train_images) + len(test_images) == 1797
    assert len(test_labels) == 359 and 0.0 <= train_images.min() and train_images.max() <= 1.0
    assert np.array_equal(load_digits_28(seed=0)[3], test_labels)


@pytest.mark.parametrize(
    ("arm", "parameters", "computation"),
    [
        ("fp32", "float32", "float32"),
        ("amp-bf16", "float32", "bfloat16"),
        ("fp16", "float16", "float16"),
    ],
)
def test_classification_arms_on_mnist_files(
    arm: str, parameters: str, computation: str, mnist_directory: Path, tmp_path: Path
) -> None:
    config = load_config(task="classification", arm=arm, steps=2, batch_size=8)
    result = train(config, data=mnist_directory, out=tmp_path / arm, progress=False)
    trace = pd.read_parquet(tmp_path / arm / "trace.parquet")
    assert tuple(trace.columns) == TRACE_COLUMNS
    assert (trace.parameter_dtype[0], trace.compute_dtype[0]) == (parameters, computation)
    assert (trace.loss_regularisation == 0).all() and (trace.loss_total == trace.loss_image).all()
    # the first loss of an untrained 10-class network is close to log(10)
    assert trace.loss_total[0] == pytest.approx(np.log(10), rel=0.2)
    if result.status == "completed":
        metrics = json.loads((tmp_path / arm / "metrics.json").read_text())
        assert 0.0 <= metrics["held_out_accuracy"] <= 1.0
    else:
        assert arm == "fp16" and result.status.startswith("diverged at step")


def test_digits_learn_and_resume_with_dropout(tmp_path: Path) -> None:
    config = load_config(
        task="classification", arm="fp32", steps=12, batch_size=32, checkpoint_every=6
    )
    train(config, data=None, out=tmp_path / "straight", progress=False)
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["held_out_accuracy"] > 0.5  # chance is 0.1
    shorter = load_config(
        task="classification", arm="fp32", steps=6, batch_size=32, checkpoint_every=6
    )
    train(shorter, data=None, out=tmp_path / "resumed", progress=False)
    train(config, data=None, out=tmp_path / "resumed", progress=False)
    # dropout draws from torch's RNG, which the checkpoint carries
    expected = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["model"]
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["model"]
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
