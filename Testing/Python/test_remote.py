"""A real inference server process on a random loopback port, spoken to over ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.errors import (
    CancelledError,
    MessageTooLargeError,
    ProtocolVersionError,
    RemoteError,
    ServerUnreachableError,
)
from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.remote.protocol import PROTOCOL_VERSION, encode_array, pack

from server_helpers import raw_request, start_server, stop, wait_ready

MAX_MB = 24  # the sample with a PDFF map is about 17 MB
CLIENT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def server():
    proc, address = start_server("--max-message-mb", MAX_MB, "--client-timeout", CLIENT_TIMEOUT_S, workers=2)
    try:
        wait_ready(address, 2)
        yield address
    finally:
        assert stop(proc) == 0  # graceful shutdown on SIGTERM


def test_info_reports_versions_and_model(server):
    info = InferenceClient(server).info()
    assert info["protocol"] == PROTOCOL_VERSION and PROTOCOL_VERSION in info["protocols"]
    assert info["models"]["name"] == "liver-mr-t2" and len(info["models"]["sha256"]) == 64
    assert info["devices"] == ["cpu"] and info["workers"] == 2
    assert info["tasks"]["liver-mr-t2"] == f"liver-mr-t2@{info['models']['version']}"
    assert "liver-lesion-ct" in info["tasks"]


def test_remote_result_identical_to_local(server, segmenter, sample_case):
    from LiverSegmentationLogic.inference.pipeline import segment_case

    image, reference = sample_case
    ff_map = Volume(np.where(reference == 1, 4.0, 90.0).astype(np.float32), image.geometry)
    local, local_readout = segment_case(segmenter, image, ff_map)
    events = []
    with InferenceClient(server) as client:
        remote, readout = client.segment(image, ff_map, progress=lambda *e: events.append(e))
    np.testing.assert_array_equal(remote.labels, local.labels)
    assert remote.geometry.allclose(image.geometry, tol=1e-9)
    assert readout["volumes_ml"] == local_readout["volumes_ml"]
    assert readout["quality"] == local_readout["quality"]  # the server's reply carries the QC too
    assert readout["fat_fraction"]["median"] == pytest.approx(4.0)
    from LiverSegmentationLogic.readouts.audit import verify_audit

    assert verify_audit(readout["audit"], image.array, remote.labels)  # the server's readouts are audited
    dones = [e[0] for e in events]
    assert dones == sorted(dones) and dones[-1] == image.array.shape[0]


def _segment_frames(image: np.ndarray, dtype="float32", **overrides):
    desc, buf = encode_array("image", image.astype(dtype), Geometry.identity())
    header = {"protocol": PROTOCOL_VERSION, "op": "segment", "id": "r1", "arrays": [desc], **overrides}
    return header, [bytes(buf)]


SMALL = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)


def _malformed():
    header, bufs = _segment_frames(SMALL)
    cases = {
        "bad JSON": [b"{not json"] + bufs,
        "truncated frames": pack(header, []),
        "extra frames": pack(header, bufs + [b"extra"]),
        "unknown op": pack(dict(header, op="explode"), bufs),
        "wrong dtype": pack(dict(header, arrays=[dict(header["arrays"][0], dtype="complex128")]), bufs),
        "shape mismatch": pack(dict(header, arrays=[dict(header["arrays"][0], shape=[3, 32, 31])]), bufs),
        # two frames under the limit (libzmq cuts off a single larger frame), 26 MB together
        "oversized": pack(dict(header, arrays=[dict(header["arrays"][0], shape=[8, 400, 1024]),
                                               dict(header["arrays"][0], name="ff_map", shape=[8, 400, 1024])]),
                          [bytes(8 * 400 * 1024 * 4)] * 2),
        "missing image": pack(dict(header, arrays=[dict(header["arrays"][0], name="other")]), bufs),
        "bad geometry": pack(dict(header, arrays=[dict(header["arrays"][0], geometry={"spacing": [1]})]), bufs),
        # a second channel must be "image_1"; the default model takes one channel anyway
        "channel gap": pack(dict(header, arrays=header["arrays"] + [dict(header["arrays"][0], name="image_2")]),
                            bufs * 2),
        "too many channels": pack(dict(header, arrays=header["arrays"] + [dict(header["arrays"][0], name="image_1")]),
                                  bufs * 2),
    }
    nan = SMALL.copy()
    nan[0, 0, 0] = np.nan
    h, b = _segment_frames(nan)
    cases["NaN voxels"] = pack(h, b)
    return cases


@pytest.mark.parametrize("case", list(_malformed()))
def test_malformed_requests_get_error_replies(server, case):
    reply = raw_request(server, _malformed()[case])
    assert reply["status"] == "error", reply
    assert reply["error"]["type"] in ("ProtocolError", "InvalidImageError", "BadRequest")
    assert reply["error"]["message"]
    # and the server still serves
    assert InferenceClient(server).info()["workers"] == 2


def test_oversized_message_limit_is_named(server):
    reply = raw_request(server, _malformed()["oversized"])
    assert "exceeds the limit" in reply["error"]["message"]
    # the client knows the server's limit and says so, instead of losing the connection
    big = Volume(np.ones((30, 512, 512), np.float32) + np.arange(30)[:, None, None], Geometry.identity())
    with InferenceClient(server) as client, pytest.raises(MessageTooLargeError, match="at most 24.0 MB"):
        client.segment(big)


def test_model_error_is_a_reply(server):
    """A volume too small for the network (fewer than 1 pixel after resampling) is still served."""
    header, bufs = _segment_frames(np.random.rand(2, 1, 1).astype(np.float32) + np.arange(2)[:, None, None])
    reply = raw_request(server, pack(header, bufs))
    assert reply["status"] in ("ok", "error")
    assert InferenceClient(server).info()["workers"] == 2


def test_protocol_version_mismatch_is_refused_clearly(server):
    header, bufs = _segment_frames(SMALL, protocol=99)
    reply = raw_request(server, pack(header, bufs))
    assert reply["error"]["type"] == "ProtocolVersionError"
    assert "upgrade the extension or the server" in reply["error"]["message"]
    client = InferenceClient(server)
    with pytest.raises(ProtocolVersionError, match="upgrade"):
        client.request("info", extra={"protocol": 99})


def test_dead_server_fails_fast():
    with zmq.Context.instance().socket(zmq.ROUTER) as probe:  # find a port nobody listens on
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    client = InferenceClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=0.5, retries=1)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachableError, match=f"unreachable at tcp://127.0.0.1:{port}"):
        client.info()
    assert time.monotonic() - t0 < 5


def test_four_concurrent_clients(server, sample_result, sample_case):
    image, _ = sample_case
    results, errors = [None] * 4, []

    def work(i):
        try:
            with InferenceClient(server, idle_timeout_s=120) as client:
                results[i] = client.segment(image)[0].labels
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for labels in results:
        np.testing.assert_array_equal(labels, sample_result.labels)


def test_cancel_returns_promptly(server, sample_case):
    image, _ = sample_case
    cancel = threading.Event()
    cancelled_at = []

    def cancel_on_first_progress(*event):
        if not cancel.is_set():
            cancelled_at.append(time.monotonic())
            cancel.set()

    with InferenceClient(server) as client:
        with pytest.raises(CancelledError):
            client.segment(image, progress=cancel_on_first_progress, cancel=cancel)
        latency = time.monotonic() - cancelled_at[0]
    # the worker stops between slice batches; one batch takes well under a second here
    assert latency < 1.0, f"cancel took {latency:.2f}s"
    info = InferenceClient(server).info()
    assert info["busy"] == 0 and info["workers"] == 2


KILLED_CLIENT = """
import sys
from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.io.sample import sample_paths
volume = read_volume(sample_paths()[0])
def progress(done, total, stage):
    print("PROGRESS", done, flush=True)
InferenceClient(sys.argv[1]).segment(volume, progress=progress)
"""


def test_killed_client_does_not_keep_a_worker_busy(server):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("PROGRESS")  # its job is running
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + CLIENT_TIMEOUT_S + 10
    while time.monotonic() < deadline:
        if InferenceClient(server).info()["busy"] == 0:
            break
        time.sleep(0.2)
    info = InferenceClient(server).info()
    assert info["busy"] == 0 and info["workers"] == 2


def test_killed_worker_is_reported_and_replaced(server, sample_case):
    image, _ = sample_case
    before = InferenceClient(server).info()["worker_list"]
    outcome = {}
    started = threading.Event()

    def work():
        try:
            with InferenceClient(server) as client:
                client.segment(image, progress=lambda *e: started.set())
        except RemoteError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(60)
    busy = [w for w in InferenceClient(server).info()["worker_list"] if w["busy"]]
    assert len(busy) == 1
    os.kill(busy[0]["pid"], signal.SIGKILL)
    t.join(60)
    assert outcome["error"].kind == "WorkerDiedError"
    info = wait_ready(server, 2)
    pids = {w["pid"] for w in info["worker_list"]}
    assert busy[0]["pid"] not in pids and len(pids) == 2 and pids != {w["pid"] for w in before}


def test_curve_refuses_clients_without_the_right_key(tmp_path):
    import zmq.auth

    server_pub, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    good_pub, good_secret = zmq.auth.create_certificates(str(allowed), "operator")
    other = tmp_path / "other"
    other.mkdir()
    _, bad_secret = zmq.auth.create_certificates(str(other), "intruder")
    proc, address = start_server("--curve-secret", server_secret, "--curve-clients", allowed, workers=0)
    try:
        server_key = zmq.auth.load_certificate(server_pub)[0]
        good = InferenceClient(address, curve_server_key=server_key, curve_client_cert=good_secret)
        assert good.info()["server_version"]
        bad = InferenceClient(address, connect_timeout_s=1, retries=0, curve_server_key=server_key,
                              curve_client_cert=bad_secret)
        with pytest.raises(ServerUnreachableError):
            bad.info()
        plain = InferenceClient(address, connect_timeout_s=1, retries=0)
        with pytest.raises(ServerUnreachableError):
            plain.info()
    finally:
        stop(proc)


def test_keys_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "LiverSegmentationLogic.cli", "keys", str(tmp_path), "--name", "srv"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert (tmp_path / "srv.key").exists() and (tmp_path / "srv.key_secret").exists()
    assert json.dumps(r.stdout)


def test_remote_job_for_the_panel(server, sample_case, sample_result):
    """The panel's remote backend: a thread job with progress events, polled without blocking."""
    from LiverSegmentationLib.jobs import CANCELLED, DONE, RemoteJob

    image, _ = sample_case
    job = RemoteJob(InferenceClient(server), image)
    progress = []
    deadline = time.monotonic() + 120
    while not job.finished and time.monotonic() < deadline:
        progress += [e for e in job.poll() if e[0] == "progress"]
        time.sleep(0.05)
    assert job.state == DONE, job.error
    np.testing.assert_array_equal(job.labels, sample_result.labels)
    assert progress and progress[-1][1] == image.array.shape[0]

    job = RemoteJob(InferenceClient(server), image)
    job.cancel()
    while not job.finished and time.monotonic() < deadline + 60:
        job.poll()
        time.sleep(0.05)
    assert job.state == CANCELLED


def test_submit_to_the_server_queue(tmp_path, sample_case):
    """Operators without a shared folder send corrected cases to the server's queue."""
    from LiverSegmentationLogic.studies.case_queue import CaseQueue

    image, reference = sample_case
    queue = tmp_path / "server-queue"
    proc, address = start_server("--queue", queue, workers=0)
    try:
        with InferenceClient(address) as client:
            assert "submit" in client.info()["capabilities"]
            record = client.submit(image, reference == 1, {"study": "S-9", "operator": "ana"})
            again = client.submit(image, reference == 1, {"study": "S-9"})
            with pytest.raises(RemoteError, match="label"):
                client.request("submit", [encode_array("image", image.array.astype(np.float32), image.geometry)])
        assert again["case_id"] == record["case_id"] == "S-9_001" and again["replaced"]
        cases = CaseQueue(queue).list()
        assert [c["case_id"] for c in cases] == ["S-9_001"]
        import SimpleITK as sitk

        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(CaseQueue(queue).paths("S-9_001")["label"])))
        np.testing.assert_array_equal(stored, (reference == 1).astype(np.uint8))
    finally:
        stop(proc)
    proc, address = start_server(workers=0)  # no --queue: refused with a reason
    try:
        with InferenceClient(address) as client, pytest.raises(RemoteError, match="no fine-tuning queue"):
            client.submit(image, reference == 1)
    finally:
        stop(proc)


def test_workers_that_cannot_load_the_model_give_a_clear_error(tmp_path, sample_case):
    image, _ = sample_case
    proc, address = start_server("--model", tmp_path / "no-such-model", workers=1)
    try:
        with InferenceClient(address, idle_timeout_s=60) as client:
            with pytest.raises(RemoteError, match="cannot start") as err:
                client.segment(image)
            assert err.value.kind == "WorkerStartError"
            assert client.info()["workers"] == 0  # the broker still answers
    finally:
        stop(proc)
