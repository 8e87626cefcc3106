"""`liverseg batch --server`: a study on an inference server, several cases in flight, the same
results as a local batch; retries, Ctrl-C and a fair share between clients."""

import csv
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.errors import CancelledError, RemoteError, ServerTimeoutError
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.remote.batch_client import RemoteSegment
from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.studies.batch import _run_case

from server_helpers import start_server, stop, wait_ready
from test_batch_and_audit import liverseg, study  # noqa: F401  (the study fixture)


@pytest.fixture(scope="module")
def server():
    proc, address = start_server(workers=2)
    try:
        wait_ready(address, 2)
        yield address
    finally:
        assert stop(proc) == 0


def _without_times(record):
    """A readout or audit record without what differs between any two runs (times, the machine)."""
    if isinstance(record, dict):
        return {k: _without_times(v) for k, v in record.items() if k not in ("timings", "time")}
    return record


def test_a_batch_on_the_server_writes_what_a_local_batch_writes(study, tmp_path, server):  # noqa: F811
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert liverseg("batch", study, "-o", local, "-q").returncode == 1  # the corrupt case fails
    r = liverseg("batch", study, "-o", remote, "-q", "--server", server)
    assert r.returncode == 1, r.stderr
    assert "2 worker(s), 2 case(s) in flight" in r.stderr

    def table(folder):
        rows = csv.DictReader(open(folder / "results.csv"))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert table(remote) == table(local)
    assert sum(row["status"] == "done" for row in table(remote)) == 2
    for case in ("site-a__p21", "site-b__visit__2__scan"):
        for name in ("readout.json", "audit.json", "row.json"):
            mine, theirs = (json.loads((folder / case / name).read_text()) for folder in (remote, local))
            if name == "row.json":
                mine.pop("seconds"), theirs.pop("seconds")
            assert _without_times(mine) == _without_times(theirs), (case, name)
        labels = [read_volume(f / case / "segmentation.seg.nrrd", validate=False).array for f in (remote, local)]
        assert np.array_equal(*labels) and labels[0].any()
        assert (remote / case / "qa.png").stat().st_size > 0


def test_a_rerun_on_the_server_skips_finished_cases(study, tmp_path, server):  # noqa: F811
    out = tmp_path / "out"
    liverseg("batch", study, "-o", out, "-q", "--server", server)
    again = liverseg("batch", study, "-o", out, "--server", server, "--in-flight", "3")
    assert again.stderr.count("done (skipped, already finished)") == 2, again.stderr


class _FakeClient:
    """The server's answers, scripted: exceptions to raise, then a result."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def segment(self, volume, ff_map, **options):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer, {"audit": {"input": {"source": None}}}

    def close(self):
        pass


def _run(answers):
    client = _FakeClient(answers)
    segment = RemoteSegment(lambda: client)
    try:
        return segment(None, None, "scan.nii.gz", threading.Event()), client, segment
    except Exception as exc:
        return exc, client, segment


def test_a_case_whose_worker_died_or_timed_out_is_tried_once_more():
    died = RemoteError("WorkerDiedError", "the worker running this request died")
    (result, readout), client, segment = _run([died, "labels"])
    assert result == "labels" and readout["audit"]["input"]["source"] == "scan.nii.gz"
    assert client.calls == 2 and segment.retried == 1
    error, client, _ = _run([ServerTimeoutError("silent"), died, "labels"])
    assert isinstance(error, RemoteError) and client.calls == 2  # once more, not twice more
    error, client, _ = _run([RemoteError("BadRequest", "not a scan"), "labels"])
    assert isinstance(error, RemoteError) and client.calls == 1  # a bad case is not retried


def test_a_busy_server_is_waited_for_not_counted_as_a_failure(monkeypatch):
    import LiverSegmentationLogic.remote.batch_client as batch_client

    monkeypatch.setattr(batch_client, "BUSY_WAIT_S", (0.01, 0.02))
    busy = RemoteError("ServerBusy", "server busy; retry later")
    (result, _), client, segment = _run([busy, busy, busy, "labels"])
    assert result == "labels" and client.calls == 4 and segment.retried == 0


def test_ctrl_c_cancels_the_cases_in_flight_on_the_server(study, tmp_path, server):  # noqa: F811
    out = tmp_path / "out"
    # SIGINT as at a terminal: a shell's background job (CI may be one) starts with it ignored
    batch = subprocess.Popen([sys.executable, "-m", "LiverSegmentationLogic.cli", "batch", str(study), "-o", str(out),
                              "-q", "--server", server], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with InferenceClient(server) as client:
        deadline = time.monotonic() + 60
        while client.info()["busy"] == 0:  # a case reached a worker
            assert time.monotonic() < deadline and batch.poll() is None
            time.sleep(0.05)
        batch.send_signal(signal.SIGINT)
        _, err = batch.communicate(timeout=60)
        assert batch.returncode == 130, err
        assert "the cases in flight were cancelled" in err
        deadline = time.monotonic() + 20
        while (info := client.info())["busy"] or info["queued"]:  # the server stopped working on them
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
    assert not list(out.glob("*/row.json"))  # nothing half-done counts as finished


def test_clients_share_the_server_fairly(server, sample_case):
    """One client keeps four requests waiting (a batch, one session over six sockets; the most
    the server lets one client queue); a second
    client's request goes to the next free worker, not behind the first client's queue."""
    image, _ = sample_case
    finished = []

    def run(name, session):
        with InferenceClient(server, session=session, idle_timeout_s=300) as client:
            client.segment(image)
            finished.append(name)

    batch = [threading.Thread(target=run, args=(f"batch-{i}", "batch-A")) for i in range(6)]
    for thread in batch:
        thread.start()
    with InferenceClient(server) as probe:  # wait until the server holds them, not a fixed time
        deadline = time.monotonic() + 60
        while (info := probe.info())["queued"] < 4:
            assert time.monotonic() < deadline, info
            time.sleep(0.02)
    other = threading.Thread(target=run, args=("other", None))
    other.start()
    for thread in [*batch, other]:
        thread.join(timeout=300)
    assert len(finished) == 7
    # first in, first out would finish it last (index 6); a fair share after the requests running
    # when it came and the one started beside it, with one more of slack for a job ending meanwhile
    assert finished.index("other") <= 4, finished


def test_cancelled_case_is_not_a_failure(tmp_path, sample_case):
    """A case stopped by Ctrl-C gets a 'cancelled' row, not a 'failed' one, and no row.json."""
    image, _ = sample_case
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image.to_sitk(), str(path))

    def cancelled(*args):
        raise CancelledError("stopped")

    row = _run_case({"case": "scan", "source": path, "ff": None}, tmp_path / "out", cancelled, threading.Event())
    assert row["status"].startswith("cancelled") and not (tmp_path / "out" / "row.json").exists()
