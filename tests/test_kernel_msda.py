"""The Triton kernels of the deformable-sampling op against the grid_sample oracle and the golden msda_case.

On a CPU (default) the real kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py
before Triton is first imported). ``MMI_TEST_DEVICE=cuda`` runs the same tests on a GPU with compiled kernels.
Shapes are sized to a few dozen programs per launch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from comfy_mm_interleaved.ops import ms_deform_attn, ms_deform_attn_op
from comfy_mm_interleaved.ops.cases import (
    MSDACase,
    causal_image_visibility,
    level_tables,
    mask_invisible_images,
    non_finite_points,
    random_case,
    reference_with_grads,
    relative_l2,
)
from conftest import assert_close, load_case

DEVICE = os.environ.get("MMI_TEST_DEVICE", "cpu")  # on "cpu", tests/conftest.py sets TRITON_INTERPRET=1

TOL = 1e-5

# (batch, queries, heads, channels, level shapes (H, W), points): non-power-of-two D, P=3, H != W, 1x1 levels
CASES = {
    "odd_sizes": (2, 5, 3, 5, [(7, 5), (4, 3), (1, 1)], 3),
    "two_images": (1, 9, 2, 24, [(3, 8), (2, 3), (1, 2)] * 2, 4),
    "wide_head": (1, 3, 2, 71, [(5, 6), (1, 1)], 2),
}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")


def run_op(case: MSDACase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output and the three gradients through the public dispatcher (custom op -> Triton kernels)."""
    value, loc, weights = (
        t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)
    )
    out = ms_deform_attn(value, case.spatial_shapes, case.level_start_index, loc, weights)
    out.backward(case.grad_output)
    return out.detach(), value.grad, loc.grad, weights.grad


def assert_matches_reference(case: MSDACase, tol: float) -> None:
    expected = reference_with_grads(case)
    for name, got, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), run_op(case), expected):
        dtype = case.value.dtype if name in ("output", "grad_value") else case.sampling_locations.dtype
        assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    case = random_case(*CASES[name], dtype=dtype, device=DEVICE, seed=len(name))
    assert_matches_reference(case, TOL if dtype == torch.float32 else 1e-10)


def test_kernel_masked_images_contribute_exactly_zero() -> None:
    """Images a query cannot see (weight 0) are skipped: their values are never read and get no gradient."""
    n_img, levels = 3, 2
    case = random_case(1, 8, 2, 6, [(4, 5), (2, 2)] * n_img, 3, device=DEVICE, seed=3)
    visible = causal_image_visibility(1, 8, n_img, DEVICE)
    visible[..., -1] = 0  # a padding image nobody sees
    case = mask_invisible_images(case, visible, levels)
    assert_matches_reference(case, TOL)

    out, grad_value, grad_loc, _ = run_op(case)
    padding = slice(int(case.level_start_index[-levels]), None)
    assert torch.all(grad_value[:, padding] == 0)
    invisible = (case.attention_weights == 0)[..., None].expand_as(grad_loc)
    assert torch.all(grad_loc[invisible] == 0)
    poisoned = case.value.clone()
    poisoned[:, padding] = float("nan")
    out_poisoned = ms_deform_attn(poisoned, *case.args()[1:])
    assert torch.equal(out_poisoned, out)


def test_kernel_non_finite_points_read_nothing_and_nan_weights_propagate() -> None:
    """As the official kernel and the gather fallback: a NaN or infinite location is off the map (zero output and
    gradients), while NaN attention weights of points on the map give NaN (a level whose weights are all NaN is not
    skipped as if they were zero)."""
    case = random_case(2, 5, 2, 3, [(4, 5), (2, 3)], 3, dtype=torch.float64, seed=11, device=DEVICE)
    poisoned, far = non_finite_points(case)
    for name, got, want in zip(
        ("output", "grad_value", "grad_loc", "grad_attn"), run_op(poisoned), reference_with_grads(far)
    ):
        assert bool(torch.isfinite(got).all()), name
        assert_close(got.cpu(), want, 1e-10, name)
    weights = case.attention_weights.clone()
    weights[0, :, 1, 0, :] = float("nan")  # head 1 of batch 0: every point of level 0, for every query
    nan_case = MSDACase(
        case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations, weights, case.grad_output
    )
    out = ms_deform_attn(*nan_case.args()).cpu()
    channels = case.value.shape[-1]
    expected = reference_with_grads(nan_case)[0]
    assert bool(out[0, :, channels : 2 * channels].isnan().all()) and torch.equal(out.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert_close(out[keep], expected[keep], 1e-10, "output beside the NaN weights")


def test_kernel_gradcheck_float64() -> None:
    case = random_case(1, 2, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float64, device=DEVICE, seed=5)
    inputs = [
        t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)
    ]

    def fn(value, loc, weights):
        return ms_deform_attn_op(value, case.spatial_shapes, case.level_start_index, loc, weights)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_kernel_half_precision_relative_l2(dtype: torch.dtype, bound: float) -> None:
    """fp16/bf16 values (fp32 locations, weights and accumulation) against the fp32 kernel."""
    case = random_case(2, 6, 2, 16, [(6, 7), (3, 3)], 4, device=DEVICE, seed=7)
    full = run_op(case)
    half = run_op(case.to(dtype))
    assert half[0].dtype == dtype and half[1].dtype == dtype
    for name, got, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), half, full):
        err = relative_l2(got, want)
        assert err <= bound, f"{dtype} {name}: relative L2 {err:.2e} > {bound:.0e}"


def test_kernel_opcheck() -> None:
    case = random_case(1, 3, 2, 4, [(3, 2), (1, 2)], 2, device=DEVICE, seed=11)
    args = (case.value.requires_grad_(), *case.args()[1:3])
    args += (case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_())
    torch.library.opcheck(ms_deform_attn_op, args)


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_kernel_msda_parity(precision: str) -> None:
    """Golden msda_case (official ms_deform_attn_core_pytorch). The kernel follows grid_sample at the kinks (floor:
    right-sided derivative) and at an exact -1 coordinate (FIXTURES.md section 7), so every entry is compared; in
    float32 the location gradient at kinks is compared with the float64 fixture, where the kink is exact."""
    golden = load_case("msda")
    dtype = torch.float64 if precision == "f64" else torch.float32
    spatial_shapes, level_start_index = level_tables(golden["in.spatial_shapes"].tolist(), DEVICE)
    case = MSDACase(
        golden["in.value"].to(DEVICE, dtype),
        spatial_shapes,
        level_start_index,
        golden["in.sampling_locations"].to(DEVICE, dtype),
        golden["in.attention_weights"].to(DEVICE, dtype),
        golden["in.out_weight_R"].to(DEVICE, dtype),
    )
    out, grad_value, grad_loc, grad_attn = run_op(case)
    assert_close(out, golden[f"{precision}.output"], TOL, "output")
    assert_close(grad_value, golden[f"{precision}.grad.value"], TOL, "grad.value")
    assert_close(grad_attn, golden[f"{precision}.grad.attention_weights"], TOL, "grad.attention_weights")
    kink = golden["flag.kink"][..., None].expand_as(grad_loc.cpu())
    smooth = ~kink
    assert_close(grad_loc.cpu()[smooth], golden[f"{precision}.grad.sampling_locations"][smooth], TOL, "grad.loc")
    assert_close(grad_loc.cpu()[kink], golden["f64.grad.sampling_locations"][kink], TOL, "grad.loc at kinks")


@pytest.mark.parametrize(
    ("prefetch", "group_levels", "q_iters"),
    [(False, None, 1), (True, 0, 1), (True, 2, 1), (False, 4, 3), (True, 4, 2), (True, 5, 1), (True, 9, 2)],
)
def test_kernel_forward_variants_agree(prefetch: bool, group_levels: int | None, q_iters: int) -> None:
    """Every forward loop (metadata read per level or one level ahead; the (image x level) axis in one program or
    split into groups of ``group_levels`` levels, also across image boundaries; one or several query blocks per
    program) gives the reference and skips unseen images exactly."""
    from comfy_mm_interleaved.kernels.msda import msda_forward

    n_img, levels = 3, 2
    case = random_case(2, 7, 2, 10, [(5, 4), (2, 3)] * n_img, 3, device=DEVICE, seed=13)
    visible = causal_image_visibility(2, 7, n_img, DEVICE)
    visible[..., -1] = 0  # nobody sees the last image
    case = mask_invisible_images(case, visible, levels)
    options = {"prefetch": prefetch, "group_levels": group_levels, "q_iters": q_iters, "block_q": 2}
    got = msda_forward(*case.args(), **options)
    assert_close(got, reference_with_grads(case)[0], TOL, f"output ({options})")
    poisoned = case.value.clone()
    poisoned[:, int(case.level_start_index[-levels]) :] = float("nan")
    assert torch.equal(msda_forward(poisoned, *case.args()[1:], **options), got)


def test_kernel_forward_rejects_bad_locality_options() -> None:
    from comfy_mm_interleaved.kernels.msda import msda_forward

    case = random_case(1, 3, 1, 4, [(2, 2)], 2, device=DEVICE, seed=1)
    for options in ({"q_iters": 0}, {"group_levels": -1}):
        with pytest.raises(ValueError, match=r"q_iters \(-?\d+\) must be >= 1 and group_levels"):
            msda_forward(*case.args(), **options)


@pytest.mark.parametrize(("variable", "value"), [("MMI_MSDA_GROUP_LEVELS", "three"), ("MMI_MSDA_Q_ITERS", "-2")])
def test_kernel_locality_variables_are_validated(variable: str, value: str) -> None:
    """A bad ``MMI_MSDA_GROUP_LEVELS`` / ``MMI_MSDA_Q_ITERS`` stops the kernels' import with a message naming it."""
    env = {**os.environ, variable: value, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "import comfy_mm_interleaved.kernels.msda"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"{variable}={value!r} must be a whole number >= 0" in done.stderr, done.stderr[-2000:]
