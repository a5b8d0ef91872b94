"""This process's resident memory, for the tests that bound what an allocation makes resident."""


def resident_mb() -> float:
    """VmRSS from /proc/self/status (Linux), in MB (10^3 kB as the kernel reports them)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e3 for line in f if line.startswith("VmRSS"))
