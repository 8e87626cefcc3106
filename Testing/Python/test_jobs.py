"""Background jobs as the Slicer panel drives them: start, poll, cancel (no Qt needed)."""

import time

import numpy as np

from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLib.jobs import CANCELLED, DONE, FAILED, LocalProcessJob


def wait(job, timeout=300, on_event=None):
    events = []
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        for event in job.poll():
            events.append(event)
            if on_event:
                on_event(event)
        time.sleep(0.05)
    events += job.poll()
    return events


def test_local_process_job_matches_in_process_result(sample_case, sample_result, tmp_path):
    image, _ = sample_case
    job = LocalProcessJob(image, work_dir=tmp_path)
    events = wait(job)
    assert job.state == DONE, job.error
    np.testing.assert_array_equal(job.labels, sample_result.labels)
    assert job.readout["volumes_ml"]["liver"] > 0
    from LiverSegmentationLogic.readouts.audit import verify_audit

    assert verify_audit(job.readout["audit"], image.array, job.labels)  # the panel's readouts are audited
    progress = [e[1] for e in events if e[0] == "progress"]
    assert progress == sorted(progress) and progress[-1] == image.array.shape[0]
    assert not list(tmp_path.iterdir())  # temporary files cleaned up


def test_cancel_kills_the_process(sample_case):
    image, _ = sample_case
    job = LocalProcessJob(image)
    t0 = time.monotonic()
    wait(job, on_event=lambda e: job.cancel() if e[0] == "progress" else None)
    assert job.state == CANCELLED
    assert job.process.poll() is not None
    assert time.monotonic() - t0 < 120


def test_failure_carries_the_core_message():
    bad = np.ones((4, 8, 8), np.float32)  # constant: an empty volume
    job = LocalProcessJob(Volume(bad, Geometry.identity()))
    wait(job)
    assert job.state == FAILED
    assert "empty" in job.error and "Traceback" not in job.error
