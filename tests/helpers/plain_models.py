"""Plain PyTorch models without repeated layers, shaped like the examples users start from.

Each is cut by the last resort of :func:`lightning_hift.units.find_units`. Forward passes are included so the
models are real, but the unit tests only read their structure.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from tests.helpers.lightning import LightningModule


class MnistMLP(nn.Module):
    """An MNIST classifier held as ``self.model``, as in many Lightning tutorials."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


class ThreeLinearMLP(nn.Module):
    """Three Linear attributes applied in turn, as in Lightning's MNIST example."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 128)
        self.l2 = nn.Linear(128, 64)
        self.l3 = nn.Linear(64, 10)

    def forward(self, images: Tensor) -> Tensor:
        hidden = nn.functional.relu(self.l1(images.flatten(1)))
        return self.l3(nn.functional.relu(self.l2(hidden)))


class LitAutoEncoder(LightningModule):
    """Lightning's autoencoder example: a 784-64-3 encoder and a 3-64-784 decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 784))

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.encoder(images.flatten(1)))


class BoringLike(LightningModule):
    """Lightning's BoringModel: a single ``nn.Linear(32, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 2)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layer(inputs)


class SmallCNN(nn.Module):
    """Two convolutions, each followed by BatchNorm, then pooling and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class NormFirstMLP(nn.Module):
    """Inputs are normalised by BatchNorm before the first Linear: a light module with no unit before it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)


class SharedBlockTwice(nn.Module):
    """One Linear registered under two names and applied twice, then a LayerNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = nn.Linear(16, 16)
        self.block_again = self.block
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.block_again(self.block(self.embed(tokens)))
        return self.head(self.norm(hidden))


class TiedHead(nn.Module):
    """The head reuses the embedding matrix, so it holds only its bias under a name of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.mix(self.embed(tokens)))


class TinyTokenTypes(nn.Module):
    """A large word embedding beside a two-row token-type embedding too small to be a unit of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(4096, 16)
        self.token_types = nn.Embedding(2, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, tokens: Tensor, token_types: Tensor) -> Tensor:
        return self.head(self.words(tokens) + self.token_types(token_types))


PLAIN_MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "mnist-mlp": (MnistMLP, ["model.1", "model.3", "model.5"]),
    "three-linear-mlp": (ThreeLinearMLP, ["l1", "l2", "l3"]),
    "autoencoder": (LitAutoEncoder, ["encoder.0", "encoder.2", "decoder.0", "decoder.2"]),
    "boring": (BoringLike, ["layer"]),
    "cnn-batchnorm": (SmallCNN, ["net.0", "net.3", "net.8"]),
    "norm-first": (NormFirstMLP, ["net.1", "net.3"]),
    "shared-block": (SharedBlockTwice, ["embed", "block", "head"]),
    "tied-head": (TiedHead, ["embed", "mix"]),
    "tiny-token-types": (TinyTokenTypes, ["words", "head"]),
    "bare-linear": (lambda: nn.Linear(4, 4), ["weight"]),
}
"""Builders of plain models and the units the last-resort cut gives them, keyed by a short name."""
