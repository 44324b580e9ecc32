"""One run per run directory, and the top-level error handler."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

from .conftest import assert_one_line_error, invoke, small_cohort

HOLD = textwrap.dedent(
    """
    import sys, time
    from bidistill.runs.lock import lock_run_dir
    with lock_run_dir(sys.argv[1], command="run held.yaml --out " + sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _holder(run_dir):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_is_refused_with_the_first_ones_pid_and_start(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = _holder(run_dir)
    try:
        result = invoke("run", config, "--out", run_dir)
        line = assert_one_line_error(result, f"{run_dir} is in use by another bidistill run")
        assert f"PID {first.pid}" in line and "started 20" in line and "run held.yaml" in line
        evaluate = invoke("evaluate", run_dir)
        assert_one_line_error(evaluate, f"PID {first.pid}")
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock", "run.lock.json"]
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_killed_run_is_recovered(tmp_path):
    config = small_cohort(tmp_path / "cohort")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    killed = _holder(run_dir)
    os.kill(killed.pid, signal.SIGKILL)  # kill -9: no cleanup, the holder file stays
    killed.wait()
    assert (run_dir / "run.lock.json").is_file()
    config.write_text(config.read_text().replace("epochs: 1", "epochs: true"))
    result = invoke("run", config, "--out", run_dir)  # stops at the config: before the lock
    assert_one_line_error(result, "'training.epochs'")
    config.write_text(config.read_text().replace("epochs: true", "epochs: 1"))
    result = invoke("run", config, "--out", run_dir, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (
        f"recovered the lock of an earlier run that stopped without releasing it (PID {killed.pid}"
        in (result.output)
    )
    assert not (run_dir / "run.lock.json").exists()  # released at the end


def test_a_bug_inside_a_run_names_run_log_with_the_traceback(tmp_path, monkeypatch):
    import bidistill.experiment.stages

    def broken(*args, **kwargs):
        raise KeyError("planted")

    monkeypatch.setattr(bidistill.experiment.stages, "write_json", broken)
    config = small_cohort(tmp_path / "cohort")
    result = invoke("run", config, "--out", tmp_path / "run")
    line = assert_one_line_error(result, "unexpected KeyError", "This is a bug in bidistill")
    log = tmp_path / "run" / "run.log"
    assert str(log) in line
    assert "Traceback" in log.read_text()


def test_a_full_disk_is_one_line_not_a_bug_report(tmp_path, monkeypatch):
    import bidistill.experiment.stages

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(bidistill.experiment.stages, "write_json", full)
    config = small_cohort(tmp_path / "cohort")
    result = invoke("run", config, "--out", tmp_path / "run")
    line = assert_one_line_error(result, "No space left on device", "run the same command again")
    assert "bug" not in line


def test_no_traceback_reaches_the_terminal_of_a_real_process(tmp_path):
    """The console script, as a user runs it, for a few bad inputs."""
    config = small_cohort(tmp_path / "cohort")
    config.write_text(config.read_text().replace("epochs: 1", "epochs: true"))
    cases = [
        ["run", str(config), "--out", str(tmp_path / "run")],
        ["train", str(config), "--out", str(tmp_path / "run"), "--seed", str(2**63)],
    ]
    for args in cases:
        done = subprocess.run(
            [sys.executable, "-m", "bidistill", *args], capture_output=True, text=True, check=False
        )
        assert done.returncode in (1, 2), (args, done.stderr)
        assert "Traceback" not in done.stdout + done.stderr, (args, done.stderr)
