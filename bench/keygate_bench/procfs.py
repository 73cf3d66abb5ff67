"""What Linux says about processes and the machine: CPU ticks, RSS, busy and steal time, load, CPU model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def proc_rss_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def system_busy_ticks() -> int:
    """user + nice + system + irq + softirq of all CPUs (/proc/stat), in clock
    ticks. With tick-based accounting the softirq time of our own loopback
    traffic is booked both there and in the interrupted task's stime, so
    leaving it out would make other processes' load look negative; steal
    (time the hypervisor gave to someone else) is nobody's here."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return user + nice + system + irq + softirq


def steal_ticks() -> int:
    """Time the hypervisor ran someone else on our virtual CPUs (recorded,
    not used to drop samples: it is not another process of this machine)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"
