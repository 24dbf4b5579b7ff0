"""What must work off Linux (most ComfyUI users run Windows): no POSIX-only import on the node pack's path, and the
POSIX-only calls guarded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from comfy_mm_interleaved.inference.memory import process_peak_rss
from comfy_mm_interleaved.train.loop import STOP_SIGNALS, StopSignal

REPO = Path(__file__).resolve().parents[1]


def test_the_library_imports_without_posix_only_modules():
    """The inference and training packages import with ``resource``, ``fcntl``, ``pwd`` and ``grp`` unavailable."""
    blocked = ("resource", "fcntl", "pwd", "grp", "termios")
    code = (
        "import sys\n"
        "import psutil  # before the block: psutil's Linux backend imports resource (its Windows one does not)\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import comfy_mm_interleaved.inference, comfy_mm_interleaved.train.loop, comfy_mm_interleaved.verify\n"
        "from comfy_mm_interleaved.inference.memory import process_peak_rss\n"
        "print(process_peak_rss())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 10 * 2**20


def test_peak_rss_without_the_resource_module(monkeypatch):
    with_resource = process_peak_rss()
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: import resource raises ImportError
    without = process_peak_rss()
    assert 10 * 2**20 < without <= with_resource * 1.05  # psutil's current RSS here (Windows: its peak working set)
    assert abs(without - psutil.Process().memory_info().rss) < 64 * 2**20


def test_stop_signal_in_the_main_thread_catches_sigterm():
    assert signal.SIGTERM in STOP_SIGNALS
    stop = StopSignal()
    try:
        assert set(stop.previous) == set(STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == stop.previous[signal.SIGTERM]


def test_stop_signal_outside_the_main_thread_installs_nothing(caplog):
    before = signal.getsignal(signal.SIGTERM)
    made: list[StopSignal] = []
    thread = threading.Thread(target=lambda: made.append(StopSignal()))
    thread.start()
    thread.join()
    assert made and made[0].previous == {} and not made[0].received
    assert signal.getsignal(signal.SIGTERM) == before
    assert "outside the main thread" in caplog.text
    made[0].restore()  # nothing to restore, and no error


def test_without_triton_the_op_takes_the_gather_fallback(monkeypatch):
    """Triton has no Windows or macOS wheels and ``requirements.txt`` does not ask for it: everything must run on
    the gather fallback, and asking for Triton explicitly must say why it cannot."""
    import torch

    from comfy_mm_interleaved.ops import backend, ms_deform_attn, ms_deform_attn_reference
    from comfy_mm_interleaved.ops.cases import random_case, relative_l2

    monkeypatch.setattr(backend, "triton_importable", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", None)  # any import of it now fails loudly
    monkeypatch.delenv("MMI_MSDA_BACKEND", raising=False)
    monkeypatch.delenv("MMI_MMFS_FUSED", raising=False)
    for device in ("cpu", "cuda"):  # a decision only: no CUDA device is needed
        assert backend.backend_for(torch.device(device)) == "gather"
        assert not backend.mmfs_fused_enabled(torch.device(device))
    case = random_case(2, 5, 2, 8, [(6, 4), (3, 2)], 3, seed=7)
    inputs = (case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations, case.attention_weights)
    value, shapes, _, locations, weights = inputs
    expected = ms_deform_attn_reference(value, shapes, locations, weights)
    assert relative_l2(ms_deform_attn(*inputs), expected) < 1e-6
    monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")
    try:
        ms_deform_attn(*inputs)
    except RuntimeError as err:
        assert "Triton is not installed" in str(err) and "unset MMI_MSDA_BACKEND" in str(err)
    else:
        raise AssertionError("MMI_MSDA_BACKEND=triton without Triton must raise")
