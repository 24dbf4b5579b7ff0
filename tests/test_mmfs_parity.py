"""MMFS module against the official implementation (golden ``mmfs_case``), float32 and float64."""

from __future__ import annotations

import pytest
import torch

from comfy_mm_interleaved.models.mmfs import MMFS, image_recency_index
from conftest import assert_close, load_case


def build_mmfs(case, dtype: torch.dtype) -> MMFS:
    kw = case.meta["constructor_kwargs"]
    module = MMFS(
        d_query=kw["d_query"],
        d_value=kw["d_value"],
        d_out=kw["d_out"],
        value_dim=int(kw["d_model"] * kw["ratio"]),
        n_levels=kw["n_levels"],
        n_heads=kw["n_heads"],
        n_points=kw["n_points"],
        spatial_shapes=kw["spatial_shapes"],
        base_spatial_shape=kw["base_spatial_shape"],
        max_num_images=kw["max_num_image_per_seq"],
        offset_init_magnitude=kw["offset_init_magnitude"],
    )
    state = {k.removeprefix("param."): v for k, v in case.tensors.items() if k.startswith("param.")}
    module.load_state_dict(state, strict=True)
    module.ignore_token.requires_grad_(True)  # the fixture reports its gradient too
    return module.to(dtype)


@pytest.mark.parametrize("case_name", ["A", "B", "C"])
@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_mmfs_parity(case_name: str, precision: str) -> None:
    case = load_case("mmfs")
    dtype = torch.float64 if precision == "f64" else torch.float32
    module = build_mmfs(case, dtype)
    inputs = {
        k: case[f"{case_name}.in.{k}"].to(dtype).requires_grad_(k in ("query", "reference_points", "input_flatten"))
        for k in ("query", "reference_points", "input_flatten")
    }
    mask = case[f"{case_name}.in.attention_mask"].to(dtype)
    out = module(
        inputs["query"],
        inputs["reference_points"],
        inputs["input_flatten"],
        case["spatial_shapes"],
        case["level_start_index"],
        attention_mask=mask,
    )
    prefix = f"{case_name}.{precision}"
    tol = 1e-5
    assert_close(out, case[f"{prefix}.output"], tol, "output")
    (out * case[f"{case_name}.in.out_weight_R"].to(dtype)).sum().backward()
    for name, tensor in inputs.items():
        assert_close(tensor.grad, case[f"{prefix}.grad.{name}"], tol, f"grad.{name}")
    for name, param in module.named_parameters():
        assert_close(param.grad, case[f"{prefix}.grad.param.{name}"], tol, f"grad.param.{name}")


def test_mmfs_sampling_plan_matches_core_tensors() -> None:
    case = load_case("mmfs")
    module = build_mmfs(case, torch.float64)
    for case_name in "ABC":
        query = case[f"{case_name}.in.query"].double()
        mask = case[f"{case_name}.in.attention_mask"].double()
        n, lq, _ = query.shape
        if mask.dim() == 2:
            visible = mask[:, None, :].expand(n, lq, -1)
        else:
            visible = mask if mask.shape[1] == lq else mask[:, -1:, :].expand(n, lq, -1)
        loc, weights, _ = module.sampling_plan(
            query, case[f"{case_name}.in.reference_points"].double(), case["spatial_shapes"], visible
        )
        assert_close(loc, case[f"{case_name}.f64.core.sampling_locations"], 1e-10, "sampling_locations")
        assert_close(weights, case[f"{case_name}.f64.core.attention_weights"], 1e-10, "attention_weights")


def test_recency_index() -> None:
    visible = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert image_recency_index(visible).tolist() == [[3, 0, 2, 1], [0, 0, 0, 0], [4, 3, 2, 1]]


def test_mmfs_refuses_more_visible_images_than_its_position_table() -> None:
    module = MMFS(8, 4, 8, 8, n_levels=1, n_heads=2, n_points=1, spatial_shapes=[2], base_spatial_shape=2,
                  max_num_images=3)  # fmt: skip
    query = torch.randn(1, 2, 8)
    reference = torch.full((1, 2, 1, 2), 0.5)
    for n_img, ok in ((2, True), (3, False)):
        features = torch.randn(1, n_img, 4, 4)
        shapes = torch.tensor([[2, 2]] * n_img)
        starts = torch.arange(n_img) * 4
        mask = torch.ones(1, n_img)
        if ok:
            assert module(query, reference, features, shapes, starts, attention_mask=mask).shape == (1, 2, 8)
        else:
            with pytest.raises(ValueError, match="built for at most 2"):
                module(query, reference, features, shapes, starts, attention_mask=mask)
