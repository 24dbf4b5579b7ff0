"""The public ``ms_deform_attn`` dispatcher, the custom op and its CPU gather fallback (no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from comfy_mm_interleaved.ops import (
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_op,
    ms_deform_attn_reference,
)
from comfy_mm_interleaved.ops.backend import backend_for
from comfy_mm_interleaved.ops.cases import MSDACase, level_tables, non_finite_points, random_case, reference_with_grads
from conftest import assert_close, load_case

CASES = {
    "odd_sizes": (2, 5, 3, 5, [(7, 5), (4, 3), (1, 1)], 3),
    "three_images": (2, 6, 2, 24, [(3, 8), (2, 3), (1, 2)] * 3, 4),
    "wide_head": (1, 3, 2, 71, [(5, 6), (1, 1)], 2),
}


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    for name in ("MMI_MSDA_BACKEND", "MMI_MSDA_COMPILE", "MMI_MSDA_CHECK_LEVELS"):
        monkeypatch.delenv(name, raising=False)


def run(case: MSDACase, fn=ms_deform_attn):
    value, loc, weights = (
        t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)
    )
    out = fn(value, case.spatial_shapes, case.level_start_index, loc, weights)
    out.backward(case.grad_output)
    return out.detach(), value.grad, loc.grad, weights.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_gather_matches_reference(name: str, dtype: torch.dtype) -> None:
    case = random_case(*CASES[name], dtype=dtype, seed=len(name))
    assert backend_for(case.value.device) == "gather"
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for label, got, want in zip(
        ("output", "grad_value", "grad_loc", "grad_attn"), run(case), reference_with_grads(case)
    ):
        assert got.dtype == dtype
        assert_close(got, want, tol, label)


def test_ops_gather_far_out_locations() -> None:
    """Locations far outside [0, 1] (clamped before the integer conversion) read nothing and get zero gradients."""
    case = random_case(2, 7, 2, 3, [(4, 5), (2, 3)], 3, dtype=torch.float64, loc_range=(-1e4, 1e4), seed=3)
    near = random_case(2, 7, 2, 3, [(4, 5), (2, 3)], 3, dtype=torch.float64, loc_range=(-2.0, 3.0), seed=3)
    for mixed in (case, near):
        for label, got, want in zip(
            ("output", "grad_value", "grad_loc", "grad_attn"), run(mixed), reference_with_grads(mixed)
        ):
            assert_close(got, want, 1e-10, label)


def test_ops_gather_non_finite_points_read_nothing_and_nan_weights_propagate() -> None:
    """A NaN or infinite location is off the map (as in the official kernel): zero output, zero gradients, no NaN
    in grad_value; a NaN attention weight of a point on the map makes its output NaN."""
    case = random_case(2, 5, 2, 3, [(4, 5), (2, 3)], 3, dtype=torch.float64, seed=11)
    poisoned, far = non_finite_points(case)
    for label, got, want in zip(
        ("output", "grad_value", "grad_loc", "grad_attn"), run(poisoned), reference_with_grads(far)
    ):
        assert bool(torch.isfinite(got).all()), label
        assert_close(got, want, 1e-10, label)
    weights = case.attention_weights.clone()
    weights[0, :, 1, 0, :] = float("nan")  # head 1 of batch 0: every point of level 0, for every query
    nan_case = MSDACase(
        case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations, weights, case.grad_output
    )
    out = run(nan_case)[0]
    channels = case.value.shape[-1]
    assert bool(out[0, :, channels : 2 * channels].isnan().all())
    expected = reference_with_grads(nan_case)[0]
    keep = ~expected.isnan()
    assert int(keep.sum()) == out.numel() - out.shape[1] * channels and torch.equal(keep, ~out.isnan())
    assert_close(out[keep], expected[keep], 1e-10, "output beside the NaN weights")


def test_ops_gather_gradcheck_float64() -> None:
    case = random_case(1, 3, 2, 5, [(3, 4), (2, 2), (1, 1)], 2, dtype=torch.float64, seed=2)
    inputs = [t.requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)]

    def fn(value, loc, weights):
        return ms_deform_attn_op(value, case.spatial_shapes, case.level_start_index, loc, weights)

    assert torch.autograd.gradcheck(fn, inputs)


def test_ops_opcheck() -> None:
    case = random_case(2, 4, 2, 3, [(3, 2), (1, 2)], 2, seed=4)
    args = (case.value.requires_grad_(), *case.args()[1:3])
    args += (case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_())
    torch.library.opcheck(ms_deform_attn_op, args)


def test_ops_torch_compile_fullgraph() -> None:
    """The dispatcher (validation, casts, custom op) and the gather fallback trace without graph breaks."""
    case = random_case(2, 4, 2, 6, [(4, 3), (2, 2)], 3, seed=6)
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend="aot_eager")
    for got, want in zip(run(case, compiled), run(case)):
        assert_close(got, want, 1e-6)
    gather = torch.compile(ms_deform_attn_gather, fullgraph=True, dynamic=True, backend="aot_eager")
    assert_close(gather(*case.args()), ms_deform_attn_gather(*case.args()), 1e-6)


def test_ops_half_value_and_mixed_dtypes() -> None:
    """fp16 / bf16 values are sampled with fp32 arithmetic; fp16 locations are upcast, fp64 anywhere means fp64."""
    case = random_case(1, 5, 2, 8, [(5, 4), (2, 2)], 2, seed=8)
    want = ms_deform_attn(*case.args())
    for dtype in (torch.float16, torch.bfloat16):
        half = case.to(dtype)
        got = ms_deform_attn(*half.args())
        assert got.dtype == dtype
        assert_close(got, want, 2e-2 if dtype == torch.bfloat16 else 2e-3, str(dtype))
    args = list(case.args())
    args[3] = args[3].double()
    assert_close(ms_deform_attn(*args), want, 1e-6, "float64 locations")


def test_ops_reference_backend_switch(monkeypatch) -> None:
    case = random_case(1, 3, 2, 4, [(3, 3)], 2, seed=9)
    monkeypatch.setenv("MMI_MSDA_BACKEND", "reference")
    out = ms_deform_attn(*case.args())
    assert torch.equal(out, ms_deform_attn_reference(case.value, case.spatial_shapes, *case.args()[3:]))
    monkeypatch.setenv("MMI_MSDA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MMI_MSDA_BACKEND"):
        ms_deform_attn(*case.args())


def test_ops_triton_backend_needs_interpreter_on_cpu(monkeypatch) -> None:
    case = random_case(1, 3, 2, 4, [(3, 3)], 2, seed=10)
    monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ms_deform_attn(*case.args())


def test_ops_compiled_gather_opt_in(monkeypatch) -> None:
    """``MMI_MSDA_COMPILE=1`` routes the CPU implementation through torch.compile (inductor) of the fallback, which
    lays its taps out query-major (eager: level-major), so batch, head and level indexing are checked here too."""
    monkeypatch.setenv("MMI_MSDA_COMPILE", "1")
    case = random_case(2, 3, 2, 5, [(3, 4), (2, 2), (1, 3)], 3, seed=12)
    got = run(case)
    for label, g, want in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, reference_with_grads(case)):
        assert_close(g, want, 1e-5, label)


def _bad_inputs():
    """(description, mutate(args) -> args, expected error, message fragment)."""

    def replace(index, fn):
        return lambda args: tuple(fn(a) if i == index else a for i, a in enumerate(args))

    return [
        ("value rank", replace(0, lambda v: v[0]), ValueError, "value must have 4 dims"),
        ("locations rank", replace(3, lambda t: t[..., 0]), ValueError, "sampling_locations must have 6 dims"),
        ("weights shape", replace(4, lambda t: t[:, :, :, :, :1].contiguous()), ValueError, "attention_weights"),
        ("levels vs locations", replace(1, lambda t: t[:1]), ValueError, "level_start_index has"),
        ("heads mismatch", replace(0, lambda v: v[:, :, :1].contiguous()), ValueError, "M=1"),
        ("not a tensor", replace(0, lambda v: v.tolist()), TypeError, "value must be a torch.Tensor"),
        ("int value", replace(0, lambda v: v.long()), TypeError, "value must be float16"),
        ("float shapes", replace(1, lambda t: t.float()), TypeError, "spatial_shapes must be int64"),
        ("int locations", replace(3, lambda t: t.long()), TypeError, "sampling_locations must be floating"),
        (
            "non-contiguous value",
            replace(0, lambda v: v.transpose(1, 2).contiguous().transpose(1, 2)),
            ValueError,
            "value must be contiguous",
        ),  # fmt: skip
        (
            "non-contiguous weights",
            replace(4, lambda t: t.transpose(3, 4).contiguous().transpose(3, 4)),
            ValueError,
            "attention_weights must be contiguous",
        ),  # fmt: skip
        ("wrong total", replace(1, lambda t: t + 1), ValueError, "add up to"),
        ("wrong starts", replace(2, lambda t: t.flip(0)), ValueError, "running sum"),
        ("empty level", replace(1, lambda t: t * torch.tensor([[1, 1], [0, 1]])), ValueError, "H, W >= 1"),
        ("device mismatch", replace(2, lambda t: t.to("meta")), ValueError, "one device"),
        ("no level", lambda a: (a[0][:, :0].contiguous(), a[1][:0], a[2][:0], a[3][:, :, :, :0].contiguous(),
                               a[4][:, :, :, :0].contiguous()), ValueError, "spatial_shapes has no level"),
        ("no point", lambda a: (*a[:3], a[3][:, :, :, :, :0].contiguous(), a[4][..., :0].contiguous()), ValueError,
         "no sampling point per level"),
        ("no channel", replace(0, lambda v: v[..., :0].contiguous()), ValueError, "no channels per head"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "mutate", "error", "message"), _bad_inputs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_ops_bad_input(label, mutate, error, message, monkeypatch) -> None:
    """Clear errors from the Python wrapper, before any launch (the op itself must never be reached)."""
    case = random_case(1, 3, 2, 4, [(3, 4), (2, 2)], 2, seed=13)

    def unreachable(*args):
        raise AssertionError("the op was called")

    monkeypatch.setattr("comfy_mm_interleaved.ops.ms_deform_attn_op", unreachable)
    with pytest.raises(error, match=message):
        ms_deform_attn(*mutate(case.args()))


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_ops_msda_parity(precision: str) -> None:
    """Golden msda_case through the default CPU path; kinks follow grid_sample (see test_kernel_msda_parity)."""
    golden = load_case("msda")
    dtype = torch.float64 if precision == "f64" else torch.float32
    spatial_shapes, level_start_index = level_tables(golden["in.spatial_shapes"].tolist())
    case = MSDACase(
        golden["in.value"].to(dtype),
        spatial_shapes,
        level_start_index,
        golden["in.sampling_locations"].to(dtype),
        golden["in.attention_weights"].to(dtype),
        golden["in.out_weight_R"].to(dtype),
    )
    out, grad_value, grad_loc, grad_attn = run(case)
    assert_close(out, golden[f"{precision}.output"], 1e-5, "output")
    assert_close(grad_value, golden[f"{precision}.grad.value"], 1e-5, "grad.value")
    assert_close(grad_attn, golden[f"{precision}.grad.attention_weights"], 1e-5, "grad.attention_weights")
    kink = golden["flag.kink"][..., None].expand_as(grad_loc)
    assert_close(grad_loc[~kink], golden[f"{precision}.grad.sampling_locations"][~kink], 1e-5, "grad.loc")
    assert_close(grad_loc[kink], golden["f64.grad.sampling_locations"][kink], 1e-5, "grad.loc at kinks")


def test_ops_level_tables_are_rechecked_after_an_in_place_edit() -> None:
    """The level-size check is remembered per table tensor (one host read for many calls) but not past an edit."""
    from comfy_mm_interleaved.ops.validation import check_levels

    shapes = torch.tensor([[2, 3], [1, 2]])
    starts = torch.tensor([0, 6])
    check_levels(shapes, starts, 8)
    check_levels(shapes, starts, 8)  # remembered
    with pytest.raises(ValueError, match="add up to"):
        check_levels(shapes, starts, 9)  # another value size is checked anew
    shapes[1, 1] = 3  # in place: the version counter moves
    with pytest.raises(ValueError, match="add up to 9 pixels"):
        check_levels(shapes, starts, 8)
    with torch.inference_mode():
        frozen_shapes, frozen_starts = torch.tensor([[2, 2]]), torch.tensor([0])
        check_levels(frozen_shapes, frozen_starts, 4)
        check_levels(frozen_shapes, frozen_starts, 4)
        with pytest.raises(ValueError, match="add up to"):
            check_levels(frozen_shapes, frozen_starts, 5)
