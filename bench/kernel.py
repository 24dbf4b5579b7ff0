"""Benchmark of the deformable-sampling implementations at MM-Interleaved's shapes (shared/reference/KERNELS.md).

For every shape it builds one set of inputs, checks every available implementation against the ``grid_sample``
reference (output and the three gradients, relative L2), then times forward and forward+backward (CUDA events and
medians on a GPU, wall-clock medians on a CPU) and prints ratios against the reference measured in the same run.

Implementations: ``reference`` (grid_sample), ``gather`` (the custom op's pure-PyTorch fallback), ``gather+compile``
(CPU, ``--compile``), ``triton`` (the custom op's CUDA path) and ``detr_cuda`` (Deformable-DETR's CUDA op, fp32 only,
JIT-built from ``--detr-src`` when nvcc works; never a dependency). The ``mmfs_*`` rows time the whole MMFS module
at the LLM-side shape: the unfused path (plan tensors + op) against the fused Triton path.

    python bench/kernel.py                                  # GPU when present, else CPU at --scale 1/64
    python bench/kernel.py --device cpu --scale 0.02        # 2-core CPU box
    python bench/kernel.py --device cuda --json $OUT/kernel_bench.json
    python bench/kernel.py --device cuda --tune-only        # BLOCK_Q x num_warps sweep of the Triton kernels
    python bench/kernel.py --device cuda --tune-only --tune-no-backward --tune-grid "" --tune-split 0x1,3x1,3x2,3x4
                                                            # the forward's locality options (levels, query blocks)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a source checkout needs no install

from comfy_mm_interleaved.models.mmfs import MMFS  # noqa: E402
from comfy_mm_interleaved.ops import ms_deform_attn, ms_deform_attn_reference  # noqa: E402
from comfy_mm_interleaved.ops.cases import (  # noqa: E402
    MSDACase,
    causal_image_visibility,
    level_tables,
    mask_invisible_images,
    random_case,
    relative_l2,
)

LLM_LEVELS = [(32, 32), (16, 16), (8, 8)]
SHAPES = {
    # name: (batch, queries, heads, channels, level shapes (H, W), points, images whose visibility is causal)
    "llm_mmfs": (2, 2048, 16, 64, LLM_LEVELS * 8, 8, 0),
    "llm_mmfs_causal": (2, 2048, 16, 64, LLM_LEVELS * 8, 8, 8),
    "unet_mmfs": (2, 4096, 16, 64, [(64, 64), (32, 32), (16, 16), (8, 8)], 8, 0),
    "detr_encoder": (1, 15200, 8, 32, [(100, 152), (50, 76), (25, 38), (13, 19)], 8, 0),
    # the largest UNet-side MMFS call of the models that run on a CPU (CFG batch 2): the golden tiny configuration
    # (8x8 latents, 64 px images) and the embedded ShapeStories model (16x16 latents); never scaled
    "tiny_unet_mmfs": (2, 64, 16, 4, [(64, 64), (32, 32), (16, 16), (8, 8)], 8, 0),
    "embedded_unet_mmfs": (2, 256, 4, 32, [(32, 32), (16, 16), (8, 8), (4, 4)], 4, 0),
}
UNSCALED = {"tiny_unet_mmfs", "embedded_unet_mmfs"}
# relative-L2 bound of an implementation against the fp32 reference, by value dtype
CHECK_BOUND = {torch.float32: 3e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class Row:
    shape: str
    impl: str
    dtype: str
    check: float | None = None
    ok: bool = True
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timer(device: torch.device, warmup: int, repeats: int, budget_ms: float | None = None):
    """Median milliseconds of ``fn()``: CUDA events around each call on a GPU, perf_counter on a CPU. Slow calls get
    fewer repeats (at least 3) so that one measurement takes about ``budget_ms``."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    budget_ms = budget_ms or (1500.0 if device.type == "cuda" else 5000.0)

    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = [once(fn)]
        count = max(1, min(repeats, 3 if times[0] * repeats > budget_ms else repeats))
        times += [once(fn) for _ in range(count - 1)]
        return statistics.median(times)

    return run


# ---------------------------------------------------------------------------------------------------------------
# Deformable-DETR's CUDA op (optional comparison)
def _portable_copy(src: Path, dst: Path) -> None:
    """Copy the sources, replacing the long-deprecated ATen calls newer torch releases reject or warn about."""
    for path in src.rglob("*"):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
            continue
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"\.type\(\)\.is_cuda\(\)", ".is_cuda()", text)
        text = re.sub(
            r"AT_DISPATCH_FLOATING_TYPES\((\w+)\.type\(\)", r"AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()", text
        )
        text = re.sub(r"\.data<", ".data_ptr<", text)
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if (
            not out.is_file() or out.read_text(encoding="utf-8") != text
        ):  # keep mtimes, so a second load reuses the build
            out.write_text(text, encoding="utf-8")


def build_detr_op(src: Path, build: Path):
    """JIT-build Deformable-DETR's ``MultiScaleDeformableAttention`` extension in ``build`` (ninja; an up-to-date
    build is reused); returns an autograd function of the op's five arguments."""
    from torch.utils.cpp_extension import load

    if not (src / "src" / "vision.cpp").is_file():
        raise FileNotFoundError(f"no Deformable-DETR sources at {src} (expected src/vision.cpp)")
    build.mkdir(parents=True, exist_ok=True)
    _portable_copy(src / "src", build / "src")
    sources = [build / "src" / "vision.cpp", build / "src" / "cpu" / "ms_deform_attn_cpu.cpp"]
    sources.append(build / "src" / "cuda" / "ms_deform_attn_cuda.cu")
    nvcc_flags = ["-O3", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__"]
    ext = load(
        name="MultiScaleDeformableAttention_bench",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(build / "src")],
        extra_cflags=["-O3", "-DWITH_CUDA"],
        extra_cuda_cflags=[*nvcc_flags, "-D__CUDA_NO_HALF2_OPERATORS__", "-DWITH_CUDA"],
        build_directory=str(build),
        verbose=False,
    )
    im2col_step = 64  # Deformable-DETR's default

    class DetrMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, level_start_index, loc, weights):
            ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, weights)
            return ext.ms_deform_attn_forward(value, spatial_shapes, level_start_index, loc, weights, im2col_step)

        @staticmethod
        def backward(ctx, grad_out):
            value, spatial_shapes, level_start_index, loc, weights = ctx.saved_tensors
            grads = ext.ms_deform_attn_backward(
                value, spatial_shapes, level_start_index, loc, weights, grad_out.contiguous(), im2col_step
            )
            return grads[0], None, None, grads[1], grads[2]

    return DetrMSDA.apply


# ---------------------------------------------------------------------------------------------------------------
# the op at one shape
def op_implementations(device: torch.device, args) -> dict[str, tuple[Callable, dict[str, str], str]]:
    """name -> (function of the op's five arguments, environment, note)."""
    impls: dict[str, tuple[Callable, dict[str, str], str]] = {
        "reference": (lambda v, s, i, loc, w: ms_deform_attn_reference(v, s, loc, w), {}, "grid_sample"),
        "gather": (ms_deform_attn, {"MMI_MSDA_BACKEND": "gather"}, "eager"),
    }
    if device.type == "cpu" and args.compile:
        impls["gather+compile"] = (ms_deform_attn, {"MMI_MSDA_BACKEND": "gather", "MMI_MSDA_COMPILE": "1"}, "")
    if device.type == "cuda":
        impls["triton"] = (ms_deform_attn, {"MMI_MSDA_BACKEND": "triton"}, "")
    return impls


def scaled_case(name: str, scale: float, dtype: torch.dtype, device: torch.device) -> MSDACase:
    batch, queries, heads, channels, shapes, points, causal_images = SHAPES[name]
    queries = queries if name in UNSCALED else max(8, round(queries * scale))
    case = random_case(batch, queries, heads, channels, shapes, points, dtype=dtype, device=device, loc_range=(0, 1))
    if causal_images:
        visible = causal_image_visibility(batch, queries, causal_images, device)
        case = mask_invisible_images(case, visible, len(shapes) // causal_images)
    return case


def grads_of(fn: Callable, case: MSDACase, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = fn(inputs[0], case.spatial_shapes, case.level_start_index, inputs[1], inputs[2])
    return [out, *torch.autograd.grad(out, inputs, case.grad_output)]


def bench_op(name: str, args, device: torch.device, dtype: torch.dtype, detr) -> list[Row]:
    case = scaled_case(name, args.scale, dtype, device)
    time_it = timer(device, args.warmup, args.repeats)
    rows: list[Row] = []
    full = case.to(torch.float32)  # the reference sees the same (rounded) values in fp32
    full_inputs = [t.detach().requires_grad_() for t in (full.value, full.sampling_locations, full.attention_weights)]
    expected = grads_of(op_implementations(device, args)["reference"][0], full, full_inputs)
    expected = [t.detach() for t in expected]
    del full_inputs

    impls = op_implementations(device, args)
    if detr is not None:
        impls["detr_cuda"] = (detr, {}, "fp32 only")
        if dtype != torch.float32:  # the like-for-like comparison with the fp32-only CUDA op
            impls["triton_fp32"] = (ms_deform_attn, {"MMI_MSDA_BACKEND": "triton"}, "fp32")
    for impl, (fn, variables, note) in impls.items():
        impl_case = full if impl in ("detr_cuda", "triton_fp32") else case
        row = Row(name, impl, str(impl_case.value.dtype).removeprefix("torch."), note=note)
        try:
            with env(**variables):
                inputs = [
                    t.detach().requires_grad_()
                    for t in (impl_case.value, impl_case.sampling_locations, impl_case.attention_weights)
                ]
                t0 = time.perf_counter()
                got = grads_of(fn, impl_case, inputs)
                row.extra["first_call_s"] = round(time.perf_counter() - t0, 3)
                row.check = max(relative_l2(g, e) for g, e in zip(got, expected))
                row.extra["rel_l2"] = [relative_l2(g, e) for g, e in zip(got, expected)]
                row.ok = impl == "reference" or row.check <= CHECK_BOUND[impl_case.value.dtype]
                del got
                if row.ok and not args.check_only:
                    with torch.no_grad():
                        row.fwd_ms = time_it(lambda: fn(impl_case.value, *impl_case.args()[1:]))  # noqa: B023
                    row.fwd_bwd_ms = time_it(lambda: grads_of(fn, impl_case, inputs))  # noqa: B023
        except Exception as error:  # one failing implementation must not stop the run
            row.ok, row.note = False, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the MMFS module (LLM side): unfused plan + op against the fused Triton path
def bench_mmfs(args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    batch, queries, heads, channels, shapes, points, n_img = SHAPES["llm_mmfs_causal"]
    queries = max(8, round(queries * args.scale))
    torch.manual_seed(0)
    module = MMFS(
        d_query=args.mmfs_dquery,
        d_value=heads * channels,
        d_out=args.mmfs_dquery,
        value_dim=heads * channels,
        n_levels=3,
        n_heads=heads,
        n_points=points,
        spatial_shapes=[32, 16, 8],
        base_spatial_shape=16,
        max_num_images=50,
        offset_init_magnitude=3.0,
    ).to(device, dtype)
    spatial_shapes, level_start_index = level_tables(shapes, device)
    query = torch.randn(batch, queries, args.mmfs_dquery, device=device, dtype=dtype)
    ref = torch.full((1, queries, 1, 2), 0.5, device=device, dtype=dtype)
    values = torch.randn(batch, int(spatial_shapes.prod(1).sum()), heads, channels, device=device, dtype=dtype)
    mask = causal_image_visibility(batch, queries, n_img, device).to(dtype)
    grad_out = torch.randn(batch, queries, args.mmfs_dquery, device=device, dtype=dtype)
    time_it = timer(device, args.warmup, args.repeats)

    def forward(q, v):
        return module(q, ref, None, spatial_shapes, level_start_index, mask, values=v)

    def forward_backward(q, v):
        out = forward(q, v)
        return [out.detach(), *torch.autograd.grad(out, [q, v], grad_out)]

    # expected: the unfused module in fp32 (default op backend) on the same inputs
    with env(MMI_MMFS_FUSED="0"):
        module.float()
        expected = forward_backward(query.float().requires_grad_(), values.float().requires_grad_())
        module.to(dtype)
    bound = 1e-4 if dtype == torch.float32 else 0.1  # bf16 offset gradients are sensitive; real bugs give ~1
    variants = {"mmfs_reference": {"MMI_MSDA_BACKEND": "reference"}, "mmfs_unfused": {"MMI_MMFS_FUSED": "0"}}
    if device.type == "cuda":
        variants["mmfs_fused"] = {}
    rows = []
    q, v = query.detach().requires_grad_(), values.detach().requires_grad_()
    for impl, variables in variants.items():
        row = Row("llm_mmfs_module", impl, str(dtype).removeprefix("torch."), note=f"d_query={args.mmfs_dquery}")
        try:
            with env(**variables):
                got = forward_backward(q, v)
                row.extra["rel_l2"] = [relative_l2(g, e) for g, e in zip(got, expected)]
                row.check = max(row.extra["rel_l2"])
                row.ok = impl == "mmfs_reference" or row.check <= bound
                del got
                if row.ok and not args.check_only:
                    with torch.no_grad():
                        row.fwd_ms = time_it(lambda: forward(query, values))
                    row.fwd_bwd_ms = time_it(lambda: forward_backward(q, v))  # noqa: B023
        except Exception as error:
            row.ok, row.note = False, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
def gather_bound_ms(case: MSDACase, l1_bytes_per_s: float = 33e12) -> float:
    """KERNELS.md's gather-bound estimate: every tap's four corner rows of D values through L1 at the ideal rate."""
    n, lq, m, levels, points, _ = case.sampling_locations.shape
    taps = n * lq * m * levels * points
    return taps * 4 * case.value.shape[3] * case.value.element_size() / l1_bytes_per_s * 1e3


def tune_triton(args, device: torch.device, dtype: torch.dtype) -> Iterator[dict]:
    """Sweep (BLOCK_Q, num_warps) of the plain kernels at ``--tune-shape``, the forward with and without the metadata
    prefetch; or (``--tune-split``) the forward's locality options instead, each checked
    against the plain forward first, at every ``--tune-grid`` configuration (the default one when the grid is empty);
    the defaults come from launch_config and the ``MMI_MSDA_*`` variables."""
    from comfy_mm_interleaved.kernels.msda import FORWARD_PREFETCH, launch_config, msda_backward, msda_forward

    case = scaled_case(args.tune_shape, args.scale, dtype, device)
    on_gpu = device.type == "cuda"  # (a CPU sweep runs the interpreter: as few calls as asked)
    time_it = timer(device, 2, max(5, args.repeats // 2)) if on_gpu else timer(device, args.warmup, args.repeats)
    lq, points, d = case.sampling_locations.shape[1], case.sampling_locations.shape[4], case.value.shape[3]
    default = launch_config(lq, points, d, value_bytes=case.value.element_size())
    grid = [tuple(int(v) for v in item.split("x")) for item in args.tune_grid.split(",") if item]
    if args.tune_split:  # the locality options instead of the plain sweep
        yield from _tune_split(args, case, grid or [(default[0], default[3])], (default[0], default[3]), time_it)
        return
    for block_q, warps in grid:
        for prefetch in (False, True):
            entry = {"block_q": block_q, "num_warps": warps, "prefetch": prefetch,
                     "default": (block_q, warps, prefetch) == (default[0], default[3], FORWARD_PREFETCH)}  # fmt: skip
            try:
                entry["fwd_ms"] = time_it(
                    lambda: msda_forward(*case.args(), block_q=block_q, num_warps=warps, prefetch=prefetch)  # noqa: B023
                )
                if not prefetch and not args.tune_no_backward:
                    entry["bwd_ms"] = time_it(
                        lambda: msda_backward(*case.args(), case.grad_output, block_q=block_q, num_warps=warps)  # noqa: B023
                    )
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
            yield entry


def _tune_split(
    args, case: MSDACase, grid: list[tuple[int, ...]], default: tuple[int, int], time_it: Callable
) -> Iterator[dict]:
    """The forward's locality options (``--tune-split``) at each (BLOCK_Q, num_warps) of ``grid``; ``default`` is
    launch_config's (BLOCK_Q, num_warps)."""
    from comfy_mm_interleaved.kernels.msda import FORWARD_GROUP_LEVELS, FORWARD_PREFETCH, FORWARD_Q_ITERS, msda_forward

    expected = msda_forward(*case.args(), group_levels=0, q_iters=1).float()
    splits = [tuple(int(v) for v in item.split("x")) for item in args.tune_split.split(",")]
    for (block_q, warps), (group_levels, q_iters) in itertools.product(grid, splits):
        entry = {"block_q": block_q, "num_warps": warps, "prefetch": FORWARD_PREFETCH,
                 "group_levels": group_levels or None, "q_iters": q_iters,
                 "default": (block_q, warps, group_levels, q_iters)
                 == (*default, FORWARD_GROUP_LEVELS, FORWARD_Q_ITERS)}  # fmt: skip
        try:
            options = {"group_levels": group_levels, "q_iters": q_iters, "block_q": block_q, "num_warps": warps}
            entry["rel_l2"] = relative_l2(msda_forward(*case.args(), **options).float(), expected)
            if entry["rel_l2"] > CHECK_BOUND[case.value.dtype]:
                raise RuntimeError(f"differs from the default forward (relL2 {entry['rel_l2']:.1e})")
            entry["fwd_ms"] = time_it(lambda: msda_forward(*case.args(), **options))  # noqa: B023
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
        yield entry


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: list[Row]) -> None:
    baseline = {}
    for row in rows:
        if row.impl in ("reference", "mmfs_reference") and row.ok:
            baseline[row.shape] = row
    header = (
        f"{'shape':<16} {'impl':<15} {'dtype':<9} {'relL2':>8} {'fwd ms':>9} {'f+b ms':>9} {'fwd x':>7} {'f+b x':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = baseline.get(row.shape)
        speed = [
            fmt(getattr(base, key) / getattr(row, key), 1) if base and getattr(row, key) and getattr(base, key) else "-"
            for key in ("fwd_ms", "fwd_bwd_ms")
        ]
        check = ("FAIL " if not row.ok else "") + (f"{row.check:.1e}" if row.check is not None else "-")
        line = f"{row.shape:<16} {row.impl:<15} {row.dtype:<9} {check:>8} {fmt(row.fwd_ms):>9} {fmt(row.fwd_bwd_ms):>9}"
        print(f"{line} {speed[0]:>7} {speed[1]:>7}  {row.note}")
    print("x = speed-up over the grid_sample reference (mmfs rows: over the module on the reference op), same run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="value dtype")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the query count (CPU default 1/64)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="CPU: also time the torch.compile'd gather fallback")
    parser.add_argument("--no-mmfs", action="store_true", help="skip the MMFS module rows")
    parser.add_argument("--mmfs-dquery", type=int, default=None, help="MMFS query width (default 5120 GPU, 64 CPU)")
    parser.add_argument("--detr-src", default=str(REPO / ".device" / "deformable_detr_ops"))
    parser.add_argument("--detr-build-dir", default=os.path.join(tempfile.gettempdir(), "mmi_detr_ops_build"))
    parser.add_argument("--no-detr", action="store_true", help="do not build Deformable-DETR's CUDA op")
    parser.add_argument("--build-detr-only", action="store_true", help="only build Deformable-DETR's op, then exit")
    parser.add_argument("--check-only", action="store_true", help="check against the reference, do not time")
    parser.add_argument("--tune-only", action="store_true", help="GPU: only sweep BLOCK_Q and num_warps of the kernels")
    parser.add_argument("--tune-grid", default="2x4,4x2,4x4,8x2,8x4,16x4", help="BLOCK_QxWARPS list for --tune-only")
    parser.add_argument("--tune-no-backward", action="store_true", help="--tune-only: time the forward only")
    parser.add_argument("--tune-shape", default="llm_mmfs", choices=sorted(SHAPES), help="--tune-only: the case")
    parser.add_argument(
        "--tune-split",
        default="",
        help="--tune-only: also time the forward's locality options, a list of GROUP_LEVELSxQ_ITERS "
        "(0 = all levels in one program), e.g. 0x1,3x1,3x2,3x4,6x2 (msda_forward's group_levels, q_iters)",
    )
    parser.add_argument("--json", default=None, help="write all results here (default $OUT/kernel_bench.json)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    args.scale = args.scale if args.scale is not None else (1.0 if on_gpu else 1 / 64)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 3)
    args.mmfs_dquery = args.mmfs_dquery or (5120 if on_gpu else 64)
    os.environ["MMI_MSDA_CHECK_LEVELS"] = "0"  # time the kernels, not the host-side validation sync
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    machine = torch.cuda.get_device_name(device) if on_gpu else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    print(
        f"device {machine}; torch {torch.__version__}; threads {torch.get_num_threads()}; value dtype {dtype}; "
        f"scale {args.scale:g}; warmup {args.warmup}, repeats {args.repeats}"
    )
    if on_gpu:
        import triton

        print(f"triton {triton.__version__}")

    detr, detr_note = None, "not on a GPU" if not on_gpu else "not requested"
    if on_gpu and (not args.no_detr or args.build_detr_only):
        t0 = time.perf_counter()
        try:
            detr = build_detr_op(Path(args.detr_src), Path(args.detr_build_dir))
            detr_note = f"built or loaded in {time.perf_counter() - t0:.0f} s"
        except Exception as error:  # the comparison is optional
            detr_note = f"build failed ({type(error).__name__}: {str(error).strip().splitlines()[-1][:200]})"
        print(f"Deformable-DETR CUDA op: {detr_note}", flush=True)
    if args.build_detr_only:
        sys.exit(0 if detr is not None else 1)

    if args.tune_only:
        if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--tune-only needs a GPU (or TRITON_INTERPRET=1 and a small --scale, to try it on a CPU)")
        bound = gather_bound_ms(scaled_case(args.tune_shape, args.scale, dtype, device))
        print(f"Triton plain-kernel sweep at {args.tune_shape}, {dtype} values (ms, median): BLOCK_Q x num_warps, "
              f"prefetch [, levels per program x query blocks per program] -> forward / backward; gather bound "
              f"{bound:.3f} ms at 33 TB/s")  # fmt: skip
        entries = []
        for entry in tune_triton(args, device, dtype):
            entries.append(entry)
            mark = " (default)" if entry["default"] else ""
            split = ""
            if "q_iters" in entry:
                split = f", {entry['group_levels'] or 'all'} x {entry['q_iters']}"
            print(f"  {entry['block_q']:>2} x {entry['num_warps']} prefetch {int(entry['prefetch'])}{split}: "
                  f"{fmt(entry.get('fwd_ms'))} / {fmt(entry.get('bwd_ms'))}{mark} {entry.get('error', '')}",
                  flush=True)  # fmt: skip
        timed = [e for e in entries if e.get("fwd_ms")]
        if timed:
            best = min(timed, key=lambda e: e["fwd_ms"])
            split = f", {best['group_levels'] or 'all'} x {best['q_iters']}" if "q_iters" in best else ""
            print(f"best forward: {best['block_q']} x {best['num_warps']} prefetch {int(best['prefetch'])}{split} "
                  f"{best['fwd_ms']:.3f} ms = {best['fwd_ms'] / bound:.2f}x the gather bound")  # fmt: skip
        out_path = args.json or (os.path.join(os.environ["OUT"], "kernel_tune.json") if os.environ.get("OUT") else None)
        if out_path:
            Path(out_path).write_text(json.dumps({"machine": machine, "dtype": str(dtype), "gather_bound_ms": bound,
                                                  "entries": entries}, indent=1), encoding="utf-8")  # fmt: skip
        return

    rows: list[Row] = []
    for name in [s for s in args.shapes.split(",") if s]:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
        rows += bench_op(name, args, device, dtype, detr if name != "llm_mmfs_causal" else None)
        print_table([r for r in rows if r.shape == name])
        print(flush=True)
    if not args.no_mmfs:
        rows += bench_mmfs(args, device, dtype)

    result = {
        "machine": machine,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "scale": args.scale,
        "detr": detr_note,
        "rows": [row.__dict__ for row in rows],
    }
    out_path = args.json or (os.path.join(os.environ["OUT"], "kernel_bench.json") if os.environ.get("OUT") else None)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print("\nSUMMARY")
    print_table(rows)
    if not all(row.ok for row in rows):
        print("some implementations FAILED their check (see the relL2 column and notes)")
        sys.exit(1)


if __name__ == "__main__":
    main()
