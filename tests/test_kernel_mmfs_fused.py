"""The fused MMFS Triton path (softmax + locations + sampling in one kernel) against the golden mmfs_case and the
unfused module path (``grid_sample`` reference op).

On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before Triton
is first imported); ``MMI_TEST_DEVICE=cuda`` runs them compiled on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from comfy_mm_interleaved.models import mmfs as mmfs_module
from comfy_mm_interleaved.models.mmfs import MMFS
from comfy_mm_interleaved.ops.cases import causal_image_visibility, level_tables, relative_l2
from conftest import assert_close, load_case
from test_mmfs_parity import build_mmfs

DEVICE = os.environ.get("MMI_TEST_DEVICE", "cpu")  # on "cpu", tests/conftest.py sets TRITON_INTERPRET=1


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Force the Triton backend (so MMFS takes its fused path) and count fused calls."""
    monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")
    monkeypatch.delenv("MMI_MMFS_FUSED", raising=False)
    calls: list[int] = []
    fused = mmfs_module.mmfs_fused_sampling

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(mmfs_module, "mmfs_fused_sampling", counting)
    return calls


@pytest.mark.parametrize("case_name", ["A", "B", "C"])
@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_kernel_mmfs_fused_parity(case_name: str, precision: str, fused_calls: list[int]) -> None:
    case = load_case("mmfs")
    dtype = torch.float64 if precision == "f64" else torch.float32
    module = build_mmfs(case, dtype).to(DEVICE)
    inputs = {
        k: case[f"{case_name}.in.{k}"].to(DEVICE, dtype).requires_grad_()
        for k in ("query", "reference_points", "input_flatten")
    }
    mask = case[f"{case_name}.in.attention_mask"].to(DEVICE, dtype)
    spatial_shapes, level_start_index = case["spatial_shapes"].to(DEVICE), case["level_start_index"].to(DEVICE)
    out = module(*inputs.values(), spatial_shapes, level_start_index, attention_mask=mask)
    assert fused_calls, "MMFS did not take the fused path"
    prefix = f"{case_name}.{precision}"
    assert_close(out, case[f"{prefix}.output"], 1e-5, "output")
    (out * case[f"{case_name}.in.out_weight_R"].to(DEVICE, dtype)).sum().backward()
    for name, tensor in inputs.items():
        assert_close(tensor.grad, case[f"{prefix}.grad.{name}"], 1e-5, f"grad.{name}")
    for name, param in module.named_parameters():
        assert_close(param.grad, case[f"{prefix}.grad.param.{name}"], 1e-5, f"grad.param.{name}")


def random_mmfs(levels: list[int], heads: int, points: int, head_dim: int, dtype: torch.dtype) -> MMFS:
    """An MMFS with every parameter random (offset weights and ignore token included)."""
    torch.manual_seed(0)
    module = MMFS(
        d_query=16,
        d_value=12,
        d_out=10,
        value_dim=heads * head_dim,
        n_levels=len(levels),
        n_heads=heads,
        n_points=points,
        spatial_shapes=levels,
        base_spatial_shape=levels[1],
        max_num_images=6,
        offset_init_magnitude=2.0,
    )
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    module.ignore_token.requires_grad_(True)
    return module.to(DEVICE, dtype)


def run_module(module, query, ref, features, spatial_shapes, level_start_index, mask, grad_out):
    """Output and gradients of (query, ref, features, every parameter)."""
    module.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in (query, ref, features)]
    out = module(*leaves, spatial_shapes, level_start_index, attention_mask=mask)
    out.backward(grad_out)
    grads = {"query": leaves[0].grad, "ref": leaves[1].grad, "features": leaves[2].grad}
    grads.update({name: p.grad.clone() for name, p in module.named_parameters()})
    return out.detach(), grads


def mmfs_inputs(n: int, lq: int, n_img: int, level_shapes, ref_batch: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    shapes = [s for _ in range(n_img) for s in level_shapes]
    spatial_shapes, level_start_index = level_tables(shapes, DEVICE)
    pixels = sum(h * w for h, w in level_shapes)
    query = torch.randn(n, lq, 16, generator=gen).to(DEVICE, dtype)
    ref = (0.2 + 0.6 * torch.rand(ref_batch, lq, 1, 2, generator=gen)).to(DEVICE, dtype)
    features = torch.randn(n, n_img, pixels, 12, generator=gen).to(DEVICE, dtype)
    grad_out = torch.randn(n, lq, 10, generator=gen).to(DEVICE, dtype)
    return query, ref, features, spatial_shapes, level_start_index, grad_out


@pytest.mark.parametrize(
    ("style", "level_shapes", "n_img"),
    [("llm", [(4, 4), (2, 3), (1, 1)], 3), ("unet", [(6, 5), (3, 3), (2, 1), (1, 1)], 1)],
)
def test_kernel_mmfs_fused_matches_unfused(style, level_shapes, n_img, fused_calls, monkeypatch) -> None:
    """LLM style: causal 3-D visibility with a never-visible padding image; UNet style: one image, four levels,
    a 2-D mask with one batch row that sees nothing, reference points broadcast over the batch."""
    n, lq = 2, 7
    module = random_mmfs([h for h, _ in level_shapes], heads=4, points=3, head_dim=6, dtype=torch.float64)
    query, ref, features, spatial_shapes, level_start_index, grad_out = mmfs_inputs(
        n, lq, n_img, level_shapes, ref_batch=n if style == "llm" else 1, dtype=torch.float64
    )
    if style == "llm":
        mask = causal_image_visibility(n, lq, n_img, DEVICE).double()
        mask[1, :, -1] = 0  # batch row 1: the last image is padding
    else:
        mask = torch.tensor([[1.0], [0.0]], device=DEVICE, dtype=torch.float64)
    args = (query, ref, features, spatial_shapes, level_start_index, mask, grad_out)
    out, grads = run_module(module, *args)
    assert fused_calls, "MMFS did not take the fused path"
    monkeypatch.setenv("MMI_MSDA_BACKEND", "reference")
    want_out, want_grads = run_module(module, *args)
    assert_close(out, want_out, 1e-10, "output")
    for name, want in want_grads.items():
        assert_close(grads[name], want, 1e-10, f"grad.{name}")

    if style == "llm":  # invisible images are skipped: never read, no gradient
        monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")
        poisoned = features.clone()
        poisoned[1, -1] = float("nan")
        out_poisoned, grads_poisoned = run_module(module, query, ref, poisoned, *args[3:])
        assert torch.equal(out_poisoned, out)
        assert torch.all(grads_poisoned["features"][1, -1] == 0)


def test_kernel_mmfs_fused_bfloat16(fused_calls, monkeypatch) -> None:
    """bf16 module and inputs (the kernel keeps locations, softmax and accumulation in fp32) against the fp32 module:
    the output within 2e-2 relative L2, every gradient at least as accurate as the unfused bf16 path's (or 2e-2)."""
    level_shapes = [(4, 4), (2, 3), (1, 1)]
    module = random_mmfs([h for h, _ in level_shapes], heads=4, points=3, head_dim=8, dtype=torch.float32)
    query, ref, features, spatial_shapes, level_start_index, grad_out = mmfs_inputs(
        2, 6, 2, level_shapes, ref_batch=2, dtype=torch.float32
    )
    mask = causal_image_visibility(2, 6, 2, DEVICE)
    args = (query, ref, features, spatial_shapes, level_start_index, mask, grad_out)
    out, grads = run_module(module, *args)
    half_args = tuple(t.bfloat16() if t.is_floating_point() else t for t in args)
    module = module.bfloat16()
    out_half, grads_half = run_module(module, *half_args)
    assert len(fused_calls) == 2
    monkeypatch.setenv("MMI_MSDA_BACKEND", "reference")
    _, grads_unfused = run_module(module, *half_args)
    assert out_half.dtype == torch.bfloat16
    assert relative_l2(out_half, out) <= 2e-2
    for name, want in grads.items():
        bound = max(2e-2, relative_l2(grads_unfused[name], want))
        assert relative_l2(grads_half[name], want) <= bound, name
