"""The CPU latency QoS request: written as the kernel reads it, held for the block, withdrawn
after; refusals name the device and what to do."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from mlsd.serving import cpu_latency
from mlsd.serving.cpu_latency import (
    CPU_LATENCY_DEVICE,
    MAX_LATENCY_US,
    cpu_latency_limit,
    current_cpu_latency,
)


def test_the_bound_is_written_as_a_native_int32_and_held_for_the_block(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(struct.pack("=i", MAX_LATENCY_US))
    before = len(os.listdir("/proc/self/fd"))
    with cpu_latency_limit(25, device) as applied:
        assert device.read_bytes()[:4] == struct.pack("=i", 25)
        assert applied == 25
        assert len(os.listdir("/proc/self/fd")) == before + 1  # the request lives in the fd
    assert len(os.listdir("/proc/self/fd")) == before  # closed: withdrawn


def test_refusals_name_the_device_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="0 to 2000000000 microseconds, got -1"):
        cpu_latency_limit(-1, tmp_path / "x").__enter__()
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing: no such device"):
        cpu_latency_limit(0, missing).__enter__()

    def refuse(path: object, flags: int) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match="needs root"):
        cpu_latency_limit(0, tmp_path / "x").__enter__()


@pytest.mark.skipif(
    not os.access(CPU_LATENCY_DEVICE, os.R_OK | os.W_OK),
    reason=f"{CPU_LATENCY_DEVICE} missing or not writable here (needs root)",
)
def test_the_kernel_applies_the_bound_while_held_and_drops_it_after() -> None:
    before = current_cpu_latency()
    with cpu_latency_limit(0) as applied:
        assert applied == 0
        assert current_cpu_latency() == 0
    assert current_cpu_latency() == before


def test_serve_refuses_a_bound_it_cannot_hold_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlsd.cli import run

    monkeypatch.setattr(cpu_latency, "CPU_LATENCY_DEVICE", tmp_path / "no-device")
    args = ["feed", "serve", "--dataset", str(tmp_path), "--model", str(tmp_path / "no-model")]
    assert run([*args, "--cpu-latency-us", "0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--cpu-latency-us" in err
    assert "no such device" in err
