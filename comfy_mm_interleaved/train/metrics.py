"""Training metrics: a CSV file (``step,time,tag,value`` rows) and TensorBoard event files.

The TensorBoard writer is dependency-free: event files are TFRecord streams of ``Event`` protocol buffers
(scalar summaries only), encoded here by hand, so logging works in any environment (ComfyUI's included) and
``tensorboard --logdir`` reads them.
"""

from __future__ import annotations

import csv
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(wall_time: float, step: int, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    """``Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5{value=1{tag=1, simple_value=2}}}``."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items()
        )
        out += _length_delimited(5, values)
    return out


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardWriter:
    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = log_dir / name
        self.handle = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        if self.handle.closed:  # logging again after close() (a second train() call on the same Trainer)
            self.handle = open(self.path, "ab")
        self.handle.write(tfrecord(event))
        self.handle.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(encode_event(time.time(), step, scalars=scalars))

    def close(self) -> None:
        self.handle.close()


class MetricsLogger:
    """CSV + TensorBoard. On resume, CSV rows of steps after the resumed step are dropped (they were redone)."""

    HEADER = ["step", "time", "tag", "value"]

    def __init__(self, output_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = output_dir / "metrics.csv"
        rows = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if r["step"].isdigit() and int(r["step"]) <= resume_step]
        with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, self.HEADER)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = TensorBoardWriter(output_dir / "tensorboard") if tensorboard else None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = time.time()
        with open(self.csv_path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            for tag, value in scalars.items():
                writer.writerow([step, f"{now:.3f}", tag, repr(float(value))])
        if self.tb is not None:
            self.tb.add_scalars(step, scalars)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(csv_path: Path, tag: str) -> dict[int, float]:
    """{step: value} of one tag from a metrics CSV (the last value wins)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(handle) if r["tag"] == tag}
