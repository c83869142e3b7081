"""A small convolutional classifier for 28×28 (MNIST) or 32×32 (CIFAR) images, BatchNorm optional."""

from __future__ import annotations

from torch import Tensor, nn


class CNN(nn.Module):
    """Two conv blocks (conv 3×3 → [BatchNorm] → ReLU → max-pool 2), global average pool, Linear to logits."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, int] = (16, 32), num_classes: int = 10,
                 batch_norm: bool = True) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for c in channels:
            blocks.append(nn.Conv2d(width, c, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(c))
            blocks += [nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # flat MNIST rows
            side = int(round((x.shape[1] // self.features[0].in_channels) ** 0.5))
            x = x.reshape(x.shape[0], -1, side, side)
        return self.head(self.features(x).mean(dim=(2, 3)))
