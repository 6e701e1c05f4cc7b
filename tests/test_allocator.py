"""reuse_freed_memory: large blocks come from malloc's heap and freed ones are reused."""
import subprocess
import sys

import rnnlab

CHILD = """
import ctypes, sys, torch
import rnnlab
applied = rnnlab.reuse_freed_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(64 * 2**20 // 4)  # 64 MB: above glibc's largest mmap threshold
del x
before = rss()
print(applied, before)
"""


def test_a_freed_large_tensor_stays_for_reuse_only_when_asked():
    if not sys.platform.startswith("linux"):  # glibc's tunables: elsewhere the call does nothing
        assert rnnlab.reuse_freed_memory() is False
        return
    def run(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
        applied, rss = out.split()
        return applied == "True", int(rss)
    on_applied, on_rss = run("on")
    off_applied, off_rss = run("off")
    assert on_applied and not off_applied
    assert on_rss - off_rss > 48 * 2**20  # the 64 MB block was kept (and returned to the OS without the call)
    assert rnnlab.reuse_freed_memory() is True and rnnlab.reuse_freed_memory() is True  # idempotent
