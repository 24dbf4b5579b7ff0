"""The Triton kernels compile for a Hopper GPU (sm_90) with the installed Triton, on a machine without a GPU.

The interpreter runs code that the GPU compiler may reject (shared/reference/KERNELS.md, A.3), so the kernels are
also compiled ahead of time, in a subprocess without ``TRITON_INTERPRET``, for the bf16-value / fp32-compute
variant used in training. The forward's value gathers must be 16-byte vector loads (8 bf16 channels per load).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("msda_forward_kernel", "msda_backward_kernel", "mmfs_forward_kernel", "mmfs_backward_kernel")
INT_POINTERS = ("shapes_ptr", "starts_ptr", "rec_ptr")
VALUE_POINTERS = ("value_ptr", "out_ptr", "grad_out_ptr", "off_tok_ptr", "off_tab_ptr", "att_tok_ptr", "att_tab_ptr")
ALIGNED = ("M", "D")  # head count and channels: multiples of 16 at the real shapes


def compile_for_hopper() -> dict[str, list[str]]:
    """Compile each kernel for sm_90; -> kernel name: the kinds of global loads in its PTX."""
    import triton.language as tl
    from comfy_mm_interleaved.kernels import mmfs, msda
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    constexprs = {"BLOCK_Q": 8, "BLOCK_P": 8, "BLOCK_D": 64, "CDT": tl.float32, "L_IMG": 3}
    constexprs |= {"PREFETCH": True, "Q_ITERS": 2}  # the forward's metadata prefetch, two query blocks per program
    report = {}
    for module, name in ((msda, KERNELS[0]), (msda, KERNELS[1]), (mmfs, KERNELS[2]), (mmfs, KERNELS[3])):
        fn = getattr(module, name)
        signature, attrs, constants = {}, {}, {}
        for index, arg in enumerate(fn.arg_names):
            if arg in constexprs:
                signature[arg], constants[arg] = "constexpr", constexprs[arg]
                continue
            if arg.endswith("_ptr"):
                signature[arg] = "*i32" if arg in INT_POINTERS else "*bf16" if arg in VALUE_POINTERS else "*fp32"
            else:
                signature[arg] = "i32"
            if arg.endswith("_ptr") or arg in ALIGNED:
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        report[name] = sorted(set(re.findall(r"ld\.global[.\w]*", kernel.asm["ptx"])))
    return report


def test_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_kernel_compile"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(KERNELS)
    assert "ld.global.v4.b32" in report["msda_forward_kernel"], report
    assert "ld.global.v4.b32" in report["mmfs_forward_kernel"], report


if __name__ == "__main__":
    print(json.dumps(compile_for_hopper()))
