"""A server killed with SIGKILL in the middle of session turns loses no completed turn."""
import time

from rnnlab.bench.serve import crash_check


def test_sigkill_mid_traffic_loses_no_completed_turn(model_dir, tmp_path, no_server_left):
    t0 = time.monotonic()
    out = crash_check(model_dir, tmp_path, sessions=4, kill_after=6, timeout=40)
    assert out["problems"] == []
    assert out["turns_completed"] >= 6
    assert out["exact"] >= 1  # at least one session resumed and was compared with its fork
    assert out["sessions_checked"] >= 2
    assert out["files"] >= 4 + 2 * out["turns_completed"]  # the sessions and two forks per completed turn, all loaded
    assert time.monotonic() - t0 < 60
