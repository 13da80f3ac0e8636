"""The discriminator as a feature extractor, the paper's protocol, scored by a linear L2-SVM.

Every convolutional block of D (after its activation) is max-pooled to a 4x4 grid, flattened, and the blocks are
concatenated; D's last convolution is its one-unit logit, not a feature map, and is left out. A LinearSVC
(squared hinge loss, L2 penalty: the paper's "regularized linear L2-SVM") with C chosen by stratified
cross-validation on the training split is scored on a held-out split. Features are used as they are: no
per-dimension standardisation, which here made the SVM several times slower to fit and no more accurate.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import models

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def d_features(D: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, sum over blocks of channels x 16) features of images in [-1, 1]; D should be in eval mode."""
    device = next(D.parameters()).device
    layers = list(D.main)[:-1]  # without the logit convolution
    out = []
    for i in range(0, len(images), batch_size):
        x, pooled = images[i:i + batch_size].to(device), []
        for layer in layers:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):  # the end of a conv block
                pooled.append(F.adaptive_max_pool2d(x, 4).flatten(1))
        out.append(torch.cat(pooled, 1).float().cpu())
    return torch.cat(out)


def with_real_statistics(D: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of D in eval mode whose batchnorm statistics are re-estimated on these real images."""
    # The paper's code normalised with batch statistics of the real images being featurised. A trained D's
    # running averages mix real and generated batches, and a random D's are the identity; re-estimating both
    # on the same real images compares the two networks' weights under the same normalisation.
    return models.with_batch_statistics(D, images.split(batch_size))


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (train indices, test indices) split of n items."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction {test_fraction} is not between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n items, n / K from each of the K classes (e.g. SVHN's 1,000 labels: 100 per digit)."""
    classes = labels.unique()
    per_class = n // len(classes)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {int(c)} has {len(idx)} training items, fewer than the {per_class} needed "
                             f"for a balanced subset of {n}")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen)


def linear_svm(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               cs=DEFAULT_CS, folds: int = 3, seed: int = 0) -> dict:
    """Held-out accuracy of a LinearSVC whose C is picked by `folds`-fold cross-validation."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import LinearSVC

    start = time.perf_counter()
    model = LinearSVC(dual="auto", max_iter=2000, random_state=seed)
    search = GridSearchCV(model, {"C": list(cs)}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        search.fit(train_x.numpy(), train_y.numpy())
        accuracy = float(search.score(test_x.numpy(), test_y.numpy()))
    return {
        "accuracy": accuracy,
        "error": 1 - accuracy,
        "C": float(search.best_params_["C"]),
        "cv_accuracy": float(search.best_score_),
        "dims": int(train_x.shape[1]),
        "n_train": len(train_x),
        "n_test": len(test_x),
        # Fits that hit max_iter: their C may be a little off, the accuracy is still a held-out measurement.
        "unconverged_fits": sum(issubclass(w.category, ConvergenceWarning) for w in caught),
        "seconds": round(time.perf_counter() - start, 2),
    }


def compare(extractors: dict, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
            cs=DEFAULT_CS, folds: int = 3, seed: int = 0) -> dict:
    """linear_svm on each named representation (a function of images) of the same train/test images."""
    results = {}
    for name, extract in extractors.items():
        results[name] = linear_svm(extract(train[0]), train[1], extract(test[0]), test[1], cs, folds, seed)
    return results


def pixels(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline representation."""
    return images.flatten(1).float()

