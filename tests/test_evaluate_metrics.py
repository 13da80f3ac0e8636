"""The evaluation math on inputs with known answers: Fréchet and kernel distances, latent walks, arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from dcgan_dist.evaluate import classifier, fid, latent


def _random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (what pytorch-fid computes)."""
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy() + s2.numpy() - 2 * root))


def test_frechet_distance_closed_forms():
    # One dimension: (m1 - m2)^2 + (sd1 - sd2)^2.
    one = fid.frechet_distance(torch.tensor([1.0]).double(), torch.tensor([[4.0]]).double(),
                               torch.tensor([-2.0]).double(), torch.tensor([[9.0]]).double())
    assert one == pytest.approx(9 + (2 - 3) ** 2)
    # Diagonal covariances: a sum over dimensions of the one-dimensional answer.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]).double(), torch.tensor([1.0, 1.0, 0.0]).double()
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([4.0, 4.0, 1.0]).double()
    expected = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert fid.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(expected)
    s = _random_cov(6, 0)
    assert fid.frechet_distance(mu1.new_zeros(6), s, mu1.new_zeros(6), s) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_matches_scipy_on_full_covariances():
    mu1, mu2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    s1, s2 = _random_cov(8, 1), _random_cov(8, 2)  # they do not commute
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8)


def test_fid_of_gaussian_features_converges_to_the_population_value():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    s1, s2 = _random_cov(4, 3), _random_cov(4, 4)
    a = mu1 + torch.randn(40_000, 4, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    b = mu2 + torch.randn(40_000, 4, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    population = _scipy_fid(mu1, s1, mu2, s2)
    estimate = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert estimate == pytest.approx(population, rel=0.03)


class _Identity(nn.Module):
    """A 'feature extractor' that passes precomputed features through, so torchmetrics sees our features."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, x):
        return x


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    metric = FrechetInceptionDistance(feature=_Identity(5))
    metric.update(a, real=True)
    metric.update(b, real=False)
    ours = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)


def test_kernel_distance_is_the_unbiased_mmd_and_separates_distributions():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(60, 3, generator=gen, dtype=torch.float64), torch.randn(60, 3, generator=gen).double() + 1
    # With one subset as large as the sets, KID is the unbiased MMD^2 of the whole sets: compute it directly.
    k = lambda x, y: (x @ y.T / 3 + 1) ** 3  # noqa: E731 - the cubic polynomial kernel of Binkowski et al.
    m = len(a)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    direct = float(off(k(a, a)) + off(k(b, b)) - 2 * k(a, b).mean())
    mean, std, size = fid.kernel_distance(a, b, subsets=1, subset_size=1000)
    assert size == 60 and std == 0
    assert mean == pytest.approx(direct, rel=1e-9)
    same, _, _ = fid.kernel_distance(a, torch.randn(60, 3, generator=gen, dtype=torch.float64), subsets=20,
                                     subset_size=50)
    assert abs(same) < mean / 5


def test_missing_or_wrong_inception_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as err:
        fid.load_inception(tmp_path / "nope.pth")
    assert "--inception-weights" in str(err.value) and "Nothing is downloaded" in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(RuntimeError, match="is not an Inception-v3 FID state dict"):
        fid.load_inception(wrong)


def test_walks_pass_through_their_points():
    points = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    for spherical in (False, True):
        path = latent.walk(points, 9, spherical)
        assert path.shape == (9, 16)
        for frame, point in ((0, 0), (4, 1), (8, 2)):
            assert torch.allclose(path[frame], points[point], atol=1e-5)
    linear = latent.walk(points[:2], 3)
    assert torch.allclose(linear[1], points[:2].mean(0))
    norms = latent.walk(points[:2], 5, spherical=True).norm(dim=1)
    assert torch.allclose(norms, torch.linspace(float(points[0].norm()), float(points[1].norm()), 5), atol=1e-4)


def test_arithmetic_expression_means_and_noise():
    terms = latent.parse_expression("0,1,2 - 3,4,5 + 6,7,8", sheet_size=10)
    assert terms == [(1, [0, 1, 2]), (-1, [3, 4, 5]), (1, [6, 7, 8])]
    z = torch.arange(10, dtype=torch.float64)[:, None].expand(10, 4)
    means, result = latent.combine(z, terms)
    assert means[:, 0].tolist() == [1, 4, 7]
    assert torch.allclose(result, torch.full((4,), 1 - 4 + 7.0, dtype=torch.float64))
    noisy = latent.jitter(result, 50, 0.25, torch.Generator().manual_seed(0))
    assert noisy.shape == (50, 4) and (noisy - result).abs().max() <= 0.25 and (noisy - result).std() > 0.1
    for bad, message in (("0,1 - 12", "index 12 is not on the sample sheet"), ("0,a", "comma-separated"),
                         ("0,1 -", "empty term|not of the form")):
        with pytest.raises(ValueError, match=message):
            latent.parse_expression(bad, sheet_size=10)


def test_coverage_score_is_one_only_for_even_confident_predictions():
    even = torch.eye(4).repeat(5, 1)  # 20 confident predictions, 5 per class
    assert classifier.coverage(even)["score"] == pytest.approx(1.0)
    collapsed = torch.eye(4)[[0] * 20]
    assert classifier.coverage(collapsed)["score"] == 0
    unsure = torch.full((20, 4), 0.25) + 0.01 * torch.eye(4).repeat(5, 1)  # every class drawn, barely preferred
    assert classifier.coverage(unsure / unsure.sum(1, keepdim=True))["score"] == pytest.approx(0.26 / 1.01)


# -- precision and recall (Kynkäänniemi et al. 2019) ---------------------------------------------------------

def test_precision_recall_by_hand_and_its_limits():
    from dcgan_dist.evaluate.precision_recall import precision_recall, radii

    real = torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1], [10, 10]])
    # k = 3: the four corners of the unit square reach their diagonal neighbour (sqrt 2); the outlier (10, 10)
    # reaches the third nearest corner, sqrt(81 + 100).
    assert torch.allclose(radii(real.double(), 3), torch.tensor([2 ** .5] * 4 + [181 ** .5], dtype=torch.float64))
    fake = torch.tensor([[0.5, 0.5], [3, 3], [30, 30], [-2, -2]])
    # (0.5, 0.5) lies in a corner's ball, (3, 3) in the outlier's (9.9 <= 13.45); (30, 30) and (-2, -2) in none.
    # Every real point lies in some generated ball (theirs are 38 to 45 wide): recall 1.
    assert precision_recall(real, fake, 3) == (0.5, 1.0)
    assert precision_recall(fake, real, 3) == (1.0, 0.5)  # the roles swap
    points = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone()) == (1.0, 1.0)  # identical sets
    assert precision_recall(points, points + 100) == (0.0, 0.0)  # disjoint sets
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(points[:3], points[:10])


def test_real_pixels_survive_the_float_round_trip_that_generated_ones_end_with():
    """FID's quantisation: reals go uint8 -> [-1, 1] -> uint8 unchanged, so both sides reach Inception as the same
    kind of uint8 image."""
    from dcgan_dist.evaluate.fid import to_uint8_rgb
    from dcgan_dist.pixels import from_uint8

    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1)
    back = to_uint8_rgb(from_uint8(values))
    assert back.shape == (1, 3, 16, 16) and torch.equal(back[0, 0], values[0, :, :, 0])
