"""Keep the CPUs out of deep idle states while the service runs: a PM QoS request.

An idle CPU sleeps; the deeper the sleep, the longer it takes to wake for the next request.
On a virtual machine an idle vCPU halts and hands its core back to the host, and waking it is
a round trip through the hypervisor, after which its caches hold the host's other work. A
request that crosses the load balancer, a replica and Redis wakes several processes, each
possibly on a sleeping CPU. Linux's CPU latency QoS interface takes a bound on that wake-up
time: a process writes the bound in microseconds, as a binary int32, to
``/dev/cpu_dma_latency`` and the kernel keeps every CPU in idle states no slower to leave,
for as long as the file stays open (closing it, or the process dying, withdraws it). ``0``
leaves only polling: an idle CPU spins instead of sleeping. It is what the ``tuned``
profiles ``latency-performance`` and ``network-latency`` do, and it costs what it says: idle
CPUs keep running (power; on a VM, the host sees the vCPUs busy).

There is no library for this in the stack (``tuned`` is a system daemon, not a dependency of
a service); the interface is four bytes, so it is written here, see the kernel's
``Documentation/power/pm_qos_interface.rst``.

    with cpu_latency_limit(0):        # the service's lifetime
        run_server(...)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CPU_LATENCY_DEVICE = Path("/dev/cpu_dma_latency")
"""The kernel's CPU latency QoS device."""

MAX_LATENCY_US = 2_000_000_000
"""The device's largest value (no bound), what it reads when nobody holds a request."""


@contextmanager
def cpu_latency_limit(microseconds: int, device: Path | None = None) -> Iterator[int]:
    """Hold a CPU wake-up latency bound of ``microseconds`` for the ``with`` block; yields the
    bound the kernel applies while it is held (the smallest of every holder's). ``device``:
    :data:`CPU_LATENCY_DEVICE` unless given.

    Raises:
        ValueError: ``microseconds`` outside ``[0, MAX_LATENCY_US]``.
        PermissionError: the device is not writable (root, or a grant of it, is needed).
        FileNotFoundError: this kernel has no such device.
    """
    if not 0 <= microseconds <= MAX_LATENCY_US:
        raise ValueError(
            f"a CPU latency bound is 0 to {MAX_LATENCY_US} microseconds, got {microseconds}"
        )
    device = CPU_LATENCY_DEVICE if device is None else device
    try:
        fd = os.open(device, os.O_RDWR)
    except PermissionError as err:
        raise PermissionError(
            f"{device}: not writable by this user; a CPU latency bound needs root (or write "
            "access to the device granted by the system); run without it otherwise"
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{device}: no such device; this kernel does not offer CPU latency QoS "
            "(CONFIG_CPU_IDLE / PM QoS); run without the bound"
        ) from err
    try:
        os.write(fd, struct.pack("=i", microseconds))
        yield current_cpu_latency(device)
    finally:
        os.close(fd)  # withdraws the request


def current_cpu_latency(device: Path | None = None) -> int:
    """The bound the kernel applies now (:data:`MAX_LATENCY_US` when nobody holds one)."""
    with open(CPU_LATENCY_DEVICE if device is None else device, "rb") as file:
        value: int = struct.unpack("=i", file.read(4))[0]
    return value
