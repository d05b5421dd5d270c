"""Whether the kernel's OOM killer fired: the only honest way to call a SIGKILLed cell "oom".

A bare SIGKILL may come from the OOM killer, a scheduler or a person. The kernel counts its OOM kills system-wide
(/proc/vmstat) and per memory cgroup (v2 memory.events, v1 memory.oom_control); reading them needs no privileges,
unlike dmesg. The bench reads them before and after each cell.
"""

from __future__ import annotations

from pathlib import Path


def oom_kill_counts() -> dict[str, int]:
    """path -> `oom_kill` count, for every counter readable here."""
    counts: dict[str, int] = {}
    for path in ["/proc/vmstat", *_cgroup_oom_files()]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                counts[str(path)] = int(value)
    return counts


def _cgroup_oom_files(root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """Files holding this process' cgroup `oom_kill` count (the bare root too: containers mount their own)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:  # cgroup v2
            files += [root / path.lstrip("/") / "memory.events", root / "memory.events"]
        elif "memory" in controllers.split(","):
            files += [
                root / "memory" / path.lstrip("/") / "memory.oom_control",
                root / "memory/memory.oom_control",
            ]
    return list(dict.fromkeys(files))


def oom_killer_fired(before: dict[str, int], after: dict[str, int]) -> bool | None:
    """Whether any counter rose between two readings; None when none could be read twice."""
    common = before.keys() & after.keys()
    if not common:
        return None
    return any(after[path] > before[path] for path in common)
