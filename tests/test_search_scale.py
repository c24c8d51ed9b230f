"""Resume after a real crash, and several workers on one study, with real processes and real storages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fixtures_search import cheap_search_config, write_config
from memcontrol.search import study as st

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "memcontrol.cli", "search", "--config", str(config), "--out", str(out), *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _study(url: str, name: str = "memcontrol") -> optuna.Study:
    return optuna.load_study(storage=st.open_storage(st.resolve_storage_url(url, ".")), study_name=name)


def _check_recorded_once(study: optuna.Study, out_dirs: list[Path], n_trials: int) -> list:
    """Every evaluated trial is in the storage once, its folder exists in exactly one run folder, and the folder's
    metrics are the ones stored; the budget is used exactly."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    evaluated = [t for t in trials if st.is_evaluated(t)]
    assert len(evaluated) == n_trials
    for t in evaluated:
        folders = [d / "trials" / str(t.number) for d in out_dirs if (d / "trials" / str(t.number)).is_dir()]
        assert len(folders) == 1, f"trial {t.number} in {folders}"
        recorded = json.loads((folders[0] / "metrics.json").read_text())
        if t.state == TrialState.COMPLETE:
            assert recorded["status"] == "ok"
            assert [recorded["metrics"]["memorization"], recorded["metrics"]["quality"]] == t.values
    return evaluated


def test_sigkill_mid_trial_then_resume(tmp_path, tiny_pipe_dir, search_data):
    # 20 training steps make a trial last long enough (seconds) to be killed in the middle of it.
    cfg = write_config(tmp_path / "search.yaml", cheap_search_config(
        tiny_pipe_dir, search_data, train={"steps": 20}, search={"n_trials": 3}))
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(_command(cfg, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = out / "trials" / "1"
    deadline = time.monotonic() + 180
    while not (victim / "mask.json").is_file():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the search never reached trial 1"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (victim / "metrics.json").exists(), "trial 1 finished before the kill; the test needs longer trials"

    before = _study(url).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    finished = (out / "trials" / "0" / "metrics.json").stat().st_mtime_ns

    result = _run(_command(cfg, out))
    after = _study(url).get_trials()
    # The finished trial is kept as it was and not recomputed.
    assert after[0].values == before[0].values and after[0].datetime_complete == before[0].datetime_complete
    assert (out / "trials" / "0" / "metrics.json").stat().st_mtime_ns == finished
    # The interrupted trial is marked, and repeated with the same parameters.
    assert after[1].state == TrialState.FAIL and st.is_interrupted(after[1])
    assert "interrupted" in after[1].user_attrs[st.ATTR_REASON]
    retry = [t for t in after if st.retried_from(t) == 1]
    assert len(retry) == 1 and retry[0].params == before[1].params and retry[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3 and len(after) == 4
    _check_recorded_once(_study(url), [out], 3)
    assert "report:" in result.stdout and (out / "report.html").is_file()


def _two_workers(kind: str, url_of, tmp_path, tiny_pipe_dir, search_data):
    """Two workers on one study: one command with --workers 2 (SQLite), or two commands started together as on two
    machines: sharing one run folder (journal file on a shared filesystem) or each with its own (PostgreSQL)."""
    steps = 12 if kind == "sqlite" else 6  # the second worker of --workers starts once the first has the cache
    cfg = write_config(tmp_path / "search.yaml", cheap_search_config(
        tiny_pipe_dir, search_data, train={"steps": steps}, search={"n_trials": 6}))
    if kind == "sqlite":
        outs = [tmp_path / "run"]
        url = url_of(outs[0])
        _run(_command(cfg, outs[0], "--workers", "2"))
    else:
        outs = [tmp_path / "run"] * 2 if kind == "journal" else [tmp_path / "run-a", tmp_path / "run-b"]
        url = url_of(tmp_path)
        procs = [subprocess.Popen(_command(cfg, o, "--storage", url), env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for o in outs]
        for p in procs:
            output, _ = p.communicate(timeout=300)
            assert p.returncode == 0, output
    outs = list(dict.fromkeys(outs))
    evaluated = _check_recorded_once(_study(url), outs, 6)
    workers = {t.user_attrs[st.ATTR_WORKER] for t in evaluated}
    assert len(workers) == 2, f"only {workers} took trials"
    for o in outs:
        assert (o / "report.html").is_file() and (o / "pareto.csv").is_file()
        selection = json.loads((o / "best" / "selection.json").read_text())
        assert selection["trial"] in {t.number for t in evaluated}


def test_two_workers_one_sqlite_file(tmp_path, tiny_pipe_dir, search_data):
    _two_workers("sqlite", lambda out: f"sqlite:///{out / 'study.db'}", tmp_path, tiny_pipe_dir, search_data)


def test_two_workers_one_journal_file(tmp_path, tiny_pipe_dir, search_data):
    _two_workers("journal", lambda d: str(d / "shared" / "study.log"), tmp_path, tiny_pipe_dir, search_data)


def test_two_workers_one_postgresql_database(tmp_path, tiny_pipe_dir, search_data, postgres_url):
    _two_workers("postgresql", lambda d: postgres_url, tmp_path, tiny_pipe_dir, search_data)


def _running_victim(study: optuna.Study, out: Path) -> optuna.trial.FrozenTrial | None:
    """A trial in the middle of training (its mask written, no metrics yet) while another trial has finished."""
    trials = study.get_trials()
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return None
    for t in trials:
        folder = out / "trials" / str(t.number)
        if (t.state == TrialState.RUNNING and st.ATTR_WORKER in t.user_attrs and (folder / "mask.json").is_file()
                and not (folder / "metrics.json").exists()):
            return t
    return None


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sigkill_one_of_two_workers_mid_trial(kind, tmp_path, tiny_pipe_dir, search_data):
    """Two workers on one study (as on two machines); one is killed in the middle of a trial. The other finishes
    the study: no finished trial is lost, and the killed trial is run again exactly once, with its parameters."""
    cfg = write_config(tmp_path / "search.yaml", cheap_search_config(
        tiny_pipe_dir, search_data, train={"steps": 20}, search={"n_trials": 4}))
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}" if kind == "sqlite" else f"journal:{out / 'study.log'}"
    procs = [subprocess.Popen(_command(cfg, out, "--storage", url), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        deadline, victim, study = time.monotonic() + 240, None, None
        while victim is None:
            ended = [p for p in procs if p.poll() is not None]
            assert not ended, "a worker ended before the kill:\n" + "\n".join(p.communicate()[0] for p in ended)
            assert time.monotonic() < deadline, "no trial was caught in the middle of training"
            time.sleep(0.05)
            try:
                study = study or _study(url)
            except (KeyError, st.MemcontrolError):  # the study is not created yet
                continue
            victim = _running_victim(study, out)
            if victim is None:
                continue
            # Freeze the worker before deciding: a trial of 20 steps can finish between the look and the kill on a
            # fast machine. Stopped, it cannot write; if it already has, let it go and catch another trial.
            pid = int(victim.user_attrs[st.ATTR_WORKER].rpartition(":")[2])
            os.kill(pid, signal.SIGSTOP)
            # The signal lands asynchronously: wait until the worker has stopped, or it may still write metrics.
            _, status = os.waitpid(pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), f"worker {pid} ended instead of stopping (status {status})"
            if (out / "trials" / str(victim.number) / "metrics.json").exists():
                os.kill(pid, signal.SIGCONT)
                victim = None
        # Kill before reading the storage again: the stopped worker may hold SQLite's write lock, which only its
        # death releases, so a read now would wait out the lock timeout and fail.
        killed = next(p for p in procs if p.pid == pid)
        os.kill(pid, signal.SIGKILL)
        killed.wait()
        before = {t.number: t.values for t in study.get_trials() if t.state == TrialState.COMPLETE}
        survivor = next(p for p in procs if p is not killed)
        output, _ = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, output
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not (out / "trials" / str(victim.number) / "metrics.json").exists(), "the victim finished before the kill"

    after = _study(url).get_trials()
    assert {n: after[n].values for n in before} == before and all(
        after[n].state == TrialState.COMPLETE for n in before)  # nothing finished is lost
    assert [t.number for t in after if st.is_interrupted(t)] == [victim.number]
    retries = [t for t in after if st.retried_from(t) == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state == TrialState.COMPLETE
    _check_recorded_once(_study(url), [out], 4)
    assert (out / "report.html").is_file()


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (the coordinator that would reap it is dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.split()[1] in ("Z", "X") for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads process states from /proc")
def test_spawned_worker_stops_when_its_coordinator_is_killed(tmp_path, tiny_pipe_dir, search_data):
    """``--workers 2``: the coordinator (worker 0) is SIGKILLed while the spawned worker 1 trains; worker 1 stops
    within seconds instead of training on, and says why in the search log (resuming after a crash: the tests
    above)."""
    # More trials than worker 0 can finish while worker 1 starts: the kill comes as soon as worker 1 has one.
    cfg = write_config(tmp_path / "search.yaml", cheap_search_config(
        tiny_pipe_dir, search_data, train={"steps": 40}, search={"n_trials": 12, "workers": 2}))
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    coordinator = subprocess.Popen(_command(cfg, out), env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.monotonic() + 240
        while child is None:
            assert coordinator.poll() is None, "the search ended before a spawned worker took a trial"
            assert time.monotonic() < deadline, "no spawned worker took a trial"
            time.sleep(0.05)
            try:
                trials = _study(url).get_trials()
            except (KeyError, st.MemcontrolError):  # the study is not created yet
                continue
            pids = {int(t.user_attrs[st.ATTR_WORKER].rpartition(":")[2]) for t in trials
                    if t.state == TrialState.RUNNING and st.ATTR_WORKER in t.user_attrs}
            child = next((pid for pid in pids if pid != coordinator.pid), None)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        deadline = time.monotonic() + 30
        while not _exited(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _exited(child), "the spawned worker went on after its coordinator was killed"
    finally:
        if child is not None and not _exited(child):
            os.kill(child, signal.SIGKILL)
    assert f"the coordinator (pid {coordinator.pid}) is gone" in (out / "search.log").read_text()
