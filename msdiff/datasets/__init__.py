"""Plain torch datasets for conditional generation (items {"x", "y", "index"}; see base.py).

- `Shapes`: the embedded default, procedural images generated in code (no download);
- `CelebA`, `Edges2Shoes`, `ImageFolder`: image files under `root` (data/README.md);
- `FashionMNIST`: the four IDX files of Fashion-MNIST (1 grey channel, padded to 32);
- `GaussianFieldDataset`: the Gaussian field with an exact posterior (msdiff.gaussian).

Layer 2: imports `msdiff.tasks`, `msdiff.gaussian`, `msdiff.images` and `msdiff.utils`, never Lightning.
"""
from msdiff.datasets.base import SPLITS, ConditionalDataset
from msdiff.datasets.fashion_mnist import FashionMNIST
from msdiff.datasets.field import GaussianFieldDataset, GaussianProblemTask
from msdiff.datasets.images import CelebA, Edges2Shoes, ImageFolder
from msdiff.datasets.shapes import Shapes, procedural_image

__all__ = [
    "SPLITS", "ConditionalDataset",
    "FashionMNIST", "GaussianFieldDataset", "GaussianProblemTask", "CelebA", "Edges2Shoes", "ImageFolder", "Shapes",
    "procedural_image",
]
