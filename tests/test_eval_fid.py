"""FID / KID maths against hand-derived values, the FID Inception-v3 (layout, quirks, weight conversion), and the
image preprocessing of the FID protocol.

``write_standard_inception_pth`` (also used by test_eval_t2i.py) writes a random-weight state dict with the names
and shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, spelled out here from the torchvision
Inception-v3 layout (not from our module), so converting and loading it strictly checks our parameter names.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.eval.fid import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
)
from comfy_mm_interleaved.eval.inception import (
    FEATURE_DIM,
    FIDInceptionV3,
    load_fid_image,
    load_fid_inception,
    resize_center_crop,
)

# ----------------------------------------------------------------------------------------------------------------
# The standard weights file's layout: (name, in channels, out channels, kernel) of every conv + batch norm


def _block_a(cin: int, pool: int) -> list[tuple[str, int, int, tuple[int, int]]]:
    return [
        ("branch1x1", cin, 64, (1, 1)),
        ("branch5x5_1", cin, 48, (1, 1)),
        ("branch5x5_2", 48, 64, (5, 5)),
        ("branch3x3dbl_1", cin, 64, (1, 1)),
        ("branch3x3dbl_2", 64, 96, (3, 3)),
        ("branch3x3dbl_3", 96, 96, (3, 3)),
        ("branch_pool", cin, pool, (1, 1)),
    ]


def _block_c(c7: int) -> list[tuple[str, int, int, tuple[int, int]]]:
    return [
        ("branch1x1", 768, 192, (1, 1)),
        ("branch7x7_1", 768, c7, (1, 1)),
        ("branch7x7_2", c7, c7, (1, 7)),
        ("branch7x7_3", c7, 192, (7, 1)),
        ("branch7x7dbl_1", 768, c7, (1, 1)),
        ("branch7x7dbl_2", c7, c7, (7, 1)),
        ("branch7x7dbl_3", c7, c7, (1, 7)),
        ("branch7x7dbl_4", c7, c7, (7, 1)),
        ("branch7x7dbl_5", c7, 192, (1, 7)),
        ("branch_pool", 768, 192, (1, 1)),
    ]


def _block_e(cin: int) -> list[tuple[str, int, int, tuple[int, int]]]:
    return [
        ("branch1x1", cin, 320, (1, 1)),
        ("branch3x3_1", cin, 384, (1, 1)),
        ("branch3x3_2a", 384, 384, (1, 3)),
        ("branch3x3_2b", 384, 384, (3, 1)),
        ("branch3x3dbl_1", cin, 448, (1, 1)),
        ("branch3x3dbl_2", 448, 384, (3, 3)),
        ("branch3x3dbl_3a", 384, 384, (1, 3)),
        ("branch3x3dbl_3b", 384, 384, (3, 1)),
        ("branch_pool", cin, 192, (1, 1)),
    ]


def standard_inception_convs() -> list[tuple[str, int, int, tuple[int, int]]]:
    stem = [
        ("Conv2d_1a_3x3", 3, 32, (3, 3)),
        ("Conv2d_2a_3x3", 32, 32, (3, 3)),
        ("Conv2d_2b_3x3", 32, 64, (3, 3)),
        ("Conv2d_3b_1x1", 64, 80, (1, 1)),
        ("Conv2d_4a_3x3", 80, 192, (3, 3)),
    ]
    blocks = {
        "Mixed_5b": _block_a(192, 32),
        "Mixed_5c": _block_a(256, 64),
        "Mixed_5d": _block_a(288, 64),
        "Mixed_6a": [
            ("branch3x3", 288, 384, (3, 3)),
            ("branch3x3dbl_1", 288, 64, (1, 1)),
            ("branch3x3dbl_2", 64, 96, (3, 3)),
            ("branch3x3dbl_3", 96, 96, (3, 3)),
        ],
        "Mixed_6b": _block_c(128),
        "Mixed_6c": _block_c(160),
        "Mixed_6d": _block_c(160),
        "Mixed_6e": _block_c(192),
        "Mixed_7a": [
            ("branch3x3_1", 768, 192, (1, 1)),
            ("branch3x3_2", 192, 320, (3, 3)),
            ("branch7x7x3_1", 768, 192, (1, 1)),
            ("branch7x7x3_2", 192, 192, (1, 7)),
            ("branch7x7x3_3", 192, 192, (7, 1)),
            ("branch7x7x3_4", 192, 192, (3, 3)),
        ],
        "Mixed_7b": _block_e(1280),
        "Mixed_7c": _block_e(2048),
    }
    return stem + [(f"{block}.{name}", *rest) for block, convs in blocks.items() for name, *rest in convs]


def standard_inception_state_dict(seed: int = 0, counters: bool = True, classes: int = 1008) -> dict[str, torch.Tensor]:
    """Random weights under the standard file's names: He-normal convolutions, batch norms near identity (so the
    features are O(1)), the ``classes``-way classifier ``fc``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, cin, cout, (kh, kw) in standard_inception_convs():
        fan_in = cin * kh * kw
        tensors[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=generator) * math.sqrt(2 / fan_in)
        tensors[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=generator)
        tensors[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=generator)
        tensors[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=generator)
        tensors[f"{name}.bn.running_var"] = 1 + 0.1 * torch.rand(cout, generator=generator)
        if counters:
            tensors[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    tensors["fc.weight"] = torch.randn(classes, 2048, generator=generator) * 0.01
    tensors["fc.bias"] = torch.zeros(classes)
    return tensors


def write_standard_inception_pth(path: Path, **options) -> dict[str, torch.Tensor]:
    tensors = standard_inception_state_dict(**options)
    torch.save(tensors, path)
    return tensors


def convert_with_cli(src: Path, dst: Path) -> None:
    assert main(["convert-inception", str(src), str(dst)]) == 0


# ----------------------------------------------------------------------------------------------------------------
# FID


def _features_with_exact_moments(mean: np.ndarray, variances: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose empirical mean is exactly ``mean`` and unbiased covariance exactly diag(``variances``)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, mean.size))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, each orthogonal to the all-ones vector (z was centred)
    return mean + q * math.sqrt(n - 1) * np.sqrt(variances)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((200, 16), (40, 64)):  # also fewer samples than dimensions: a singular covariance
        features = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.standard_normal(d)
        assert abs(fid_from_features(features, features)) < 1e-6


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # the same distributions in a rotated basis (non-diagonal covariances): FID is rotation invariant
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = frechet_distance(
        rotation @ mu1, rotation @ np.diag(s1) @ rotation.T, rotation @ mu2, rotation @ np.diag(s2) @ rotation.T
    )
    assert rotated == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # sample sets with exactly these moments
    x = _features_with_exact_moments(mu1, s1, 50, seed=2)
    y = _features_with_exact_moments(mu2, s2, 30, seed=3)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fid_of_scaled_covariances_matches_closed_form():
    # S2 = a S1: sqrt(S1 S2) = sqrt(a) S1, so FID = |mu1 - mu2|^2 + (1 - sqrt(a))^2 tr(S1)
    rng = np.random.default_rng(4)
    d, a = 10, 2.5
    factor = rng.standard_normal((d, d))
    s1 = factor @ factor.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(np.sum((mu1 - mu2) ** 2) + (1 - math.sqrt(a)) ** 2 * np.trace(s1))
    assert frechet_distance(mu1, s1, mu2, a * s1) == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mean, cov = feature_statistics(x)
    assert mean.tolist() == pytest.approx([3.0, 2.0])
    # deviations (-2, 0), (0, -2), (2, 2): sums of products / (3 - 1)
    assert cov.tolist()[0] == pytest.approx([4.0, 2.0])
    assert cov.tolist()[1] == pytest.approx([2.0, 4.0])


def test_fid_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_features(np.ones((1, 4)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((3, 2), np.nan), np.ones((3, 2)))


# ----------------------------------------------------------------------------------------------------------------
# KID


def _mmd2_double_loop(x: list[list[float]], y: list[list[float]]) -> float:
    """The unbiased MMD^2 estimator with k(a, b) = (a.b / d + 1)^3, written out term by term."""
    d, m = len(x[0]), len(x)

    def k(a: list[float], b: list[float]) -> float:
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_double_loop_when_subsets_are_whole_sets():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
    kid = kernel_inception_distance(x, y, subsets=4, subset_size=1000)  # capped at the 6 samples
    assert kid.subset_size == 6
    assert kid.mean == pytest.approx(_mmd2_double_loop(x.tolist(), y.tolist()), rel=1e-12)
    assert kid.std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_over_random_subsets_estimates_the_mean_over_all_subsets():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((5, 2)), rng.standard_normal((5, 2)) * 1.5
    subsets = [list(c) for c in itertools.combinations(range(5), 3)]
    exact = [_mmd2_double_loop(x[i].tolist(), y[j].tolist()) for i in subsets for j in subsets]
    expectation, spread = float(np.mean(exact)), float(np.std(exact))
    kid = kernel_inception_distance(x, y, subsets=400, subset_size=3, seed=7)
    assert kid.subset_size == 3
    assert abs(kid.mean - expectation) < 4 * spread / math.sqrt(400)
    assert kid.std == pytest.approx(spread, rel=0.2)


def test_kid_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.ones((1, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernel_inception_distance(np.ones((4, 3)), np.ones((4, 2)))


# ----------------------------------------------------------------------------------------------------------------
# Inception


def test_inception_layout_matches_the_standard_weights_file():
    model = FIDInceptionV3()
    standard = standard_inception_state_dict()
    ours = model.state_dict()
    assert set(ours) == set(standard) - {"fc.weight", "fc.bias"}
    assert all(ours[k].shape == standard[k].shape for k in ours)
    model.load_state_dict({k: v for k, v in standard.items() if not k.startswith("fc.")}, strict=True)


def test_inception_features_shape_and_input_size():
    model = FIDInceptionV3().eval()
    model.load_state_dict({k: v for k, v in standard_inception_state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        small = model(torch.rand(2, 3, 64, 64))
        x = torch.rand(1, 3, 50, 70)
        out = model(x)
        # the network resizes every input to 299 x 299 first: feeding the resized image gives the same features
        resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert torch.allclose(model(resized), out, atol=1e-5)
    assert small.shape == (2, FEATURE_DIM) and out.shape == (1, FEATURE_DIM)
    assert torch.isfinite(small).all() and small.abs().mean() > 1e-3


def test_inception_pools_ignore_padding_and_last_block_max_pools():
    from comfy_mm_interleaved.eval.inception import InceptionE, _avg_pool_3x3

    constant = torch.full((1, 1, 5, 5), 2.0)
    assert torch.equal(_avg_pool_3x3(constant), constant)  # zero padding would lower the border means
    # the pool branch of the last block: with a 1x1 conv that copies channel 0, a single peak spreads as a 3x3 max
    block = InceptionE(4, max_pool=True).eval()
    with torch.no_grad():
        weight = torch.zeros(192, 4, 1, 1)
        weight[:, 0] = 1
        block.branch_pool.conv.weight.copy_(weight)
        x = torch.zeros(1, 4, 5, 5)
        x[0, 0, 2, 2] = 3.0
        expected = torch.zeros(5, 5)
        expected[1:4, 1:4] = 3.0 / math.sqrt(1 + block.branch_pool.bn.eps)  # fresh batch norm: mean 0, variance 1
        assert torch.allclose(block(x)[0, -192], expected, atol=1e-6)


def test_convert_inception_cli_writes_loadable_safetensors(tmp_path):
    src, dst = tmp_path / "pt_inception.pth", tmp_path / "inception.safetensors"
    standard = write_standard_inception_pth(src, counters=False)  # older files lack the batch-norm counters
    convert_with_cli(src, dst)
    stored = load_file(str(dst))
    assert "fc.weight" not in stored and stored["Mixed_7c.branch_pool.bn.num_batches_tracked"].item() == 0
    model = load_fid_inception(dst)  # strict load
    for name, tensor in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, standard[name]), name
    assert not model.training


def test_convert_inception_bad_input(tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    assert main(["convert-inception", str(tmp_path / "absent.pth"), str(dst)]) == 1
    assert "not found" in capsys.readouterr().err

    imagenet = tmp_path / "torchvision.pth"
    write_standard_inception_pth(imagenet, classes=1000)
    assert main(["convert-inception", str(imagenet), str(dst)]) == 1
    assert "1000-class classifier" in capsys.readouterr().err

    partial = tmp_path / "partial.pth"
    tensors = standard_inception_state_dict()
    del tensors["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(tensors, partial)
    assert main(["convert-inception", str(partial), str(dst)]) == 1
    assert "missing: Mixed_6b.branch7x7_2.conv.weight" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    assert main(["convert-inception", str(garbage), str(dst)]) == 1
    assert "not a readable PyTorch weights file" in capsys.readouterr().err
    assert not dst.exists()

    with pytest.raises(FileNotFoundError, match="convert-inception"):
        load_fid_inception(tmp_path / "never-converted.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_resize_center_crop_keeps_the_centre():
    # a 200 x 100 image whose red channel is the column index: shorter side 100 -> 50 gives 100 x 50, the crop
    # starts at column 25 of the resized image, i.e. around column 50.5 of the original
    columns = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    image = Image.fromarray(np.stack([columns, np.zeros_like(columns), np.zeros_like(columns)], axis=-1))
    cropped = np.asarray(resize_center_crop(image, 50))
    assert cropped.shape == (50, 50, 3)
    assert abs(float(cropped[25, 0, 0]) - 50.5) <= 1.0
    assert abs(float(cropped[25, 49, 0]) - 148.5) <= 1.0


def test_load_fid_image_is_rgb_in_unit_range(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((30, 40), 255, dtype=np.uint8)).save(gray)
    tensor = load_fid_image(gray, 16)
    assert tensor.shape == (3, 16, 16) and torch.allclose(tensor, torch.ones_like(tensor))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    with pytest.raises(ValueError, match="cannot read the image"):
        load_fid_image(broken, 16)
