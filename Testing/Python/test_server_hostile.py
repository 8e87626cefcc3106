"""The inference server against hostile and unlucky clients and workers, on loopback.

Every input that once ended the server process is sent again; after each, a valid request must
still get the right labels. Rogue workers, dying and hanging workers, late cancels, floods and
bad queue submits are tried too.
"""

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
import SimpleITK as sitk
import zmq
import zmq.auth

from LiverSegmentationLogic.errors import CancelledError, InvalidImageError, RemoteError
from LiverSegmentationLogic.inference.pipeline import segment_case
from LiverSegmentationLogic.io.volumes import Geometry, Volume, crop_volume, validate_volume
from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.remote.protocol import PROTOCOL_VERSION, encode_array, pack
from LiverSegmentationLogic.studies.case_queue import CaseQueue
from server_helpers import raw_request, start_server, stop, wait_ready

WORKER_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def small_case(sample_case):
    """Eight slices of the sample through the liver: quick to segment, real labels."""
    image, reference = sample_case
    z = int(np.argmax(np.count_nonzero(reference == 1, axis=(1, 2))))
    box = (slice(z - 4, z + 4), slice(None), slice(None))
    return crop_volume(image, box), reference[box]


@pytest.fixture(scope="module")
def small_labels(segmenter, small_case):
    labels = segment_case(segmenter, small_case[0])[0].labels
    assert np.count_nonzero(labels == 1) > 1000
    return labels


def free_port() -> int:
    with zmq.Context.instance().socket(zmq.ROUTER) as probe:
        return probe.bind_to_random_port("tcp://127.0.0.1")


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """A server with one local worker, a queue, a known backend port and a short worker timeout."""
    folder = tmp_path_factory.mktemp("hostile")
    backend = f"tcp://127.0.0.1:{free_port()}"
    proc, address = start_server("--backend", backend, "--queue", folder / "queue", "--worker-timeout",
                                 WORKER_TIMEOUT_S, "--max-message-mb", 24, "--client-timeout", 5, workers=1)
    try:
        wait_ready(address, 1)
        yield {"address": address, "backend": backend, "proc": proc, "queue": folder / "queue", "folder": folder}
    finally:
        assert stop(proc) == 0
        assert not [line for line in proc.log if "unexpected failure" in line], "".join(proc.log[-40:])


def assert_still_serves(server, small_case, small_labels):
    assert server["proc"].poll() is None, "the server process ended"
    with InferenceClient(server["address"], idle_timeout_s=60) as client:
        result, _ = client.segment(small_case[0])
    np.testing.assert_array_equal(result.labels, small_labels)


def _request(op="segment", arrays=(), **fields):
    descs = [d for d, _ in arrays]
    header = {"protocol": PROTOCOL_VERSION, "op": op, "id": "h1", "arrays": descs, **fields}
    return pack(header, [bytes(b) for _, b in arrays])


TINY = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)


def _image(geometry=None, **desc_overrides):
    desc, buf = encode_array("image", TINY, geometry or Geometry.identity())
    return dict(desc, **desc_overrides), buf


def _geometry_desc(**geometry):
    desc, buf = _image()
    return dict(desc, geometry=dict(desc["geometry"], **geometry)), buf


def _with_nan(clean: str, with_nan: str):
    """A segment request whose geometry holds a NaN (which json.dumps would not write)."""
    desc, buf = _image()
    header = json.dumps({"protocol": 1, "op": "segment", "id": "h1", "arrays": [desc]})
    assert clean in header
    return [header.replace(clean, with_nan, 1).encode(), bytes(buf)]


def hostile_frontend_messages():
    label_desc, label_buf = encode_array("label", (TINY > 0.5).astype(np.uint8), Geometry.identity())
    return {
        "arrays nested 100,000 deep": [b"[" * 100_000 + b"]" * 100_000],
        "objects nested 100,000 deep": [b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
        "integer of 5,000 digits": [b'{"protocol": 1, "op": "info", "id": "x", "n": ' + b"9" * 5000 + b"}"],
        "submit options a list": _request("submit", [_image(), (label_desc, label_buf)], options=[1, 2]),
        "options.labels a list": _request("submit", [_image(), (label_desc, label_buf)], options={"labels": [1]}),
        "meta.study a number": _request("submit", [_image(), (label_desc, label_buf)],
                                        options={"meta": {"study": 12}}),
        "dtype a list": _request(arrays=[_image(dtype=["float32"])]),
        "shape entry 2**70": _request(arrays=[_image(shape=[2**70, 16, 16])]),
        "spacing 150 mm": _request(arrays=[_image(Geometry.identity((150.0, 150.0, 150.0)))]),
        "singular direction": _request(arrays=[_geometry_desc(direction=[1, 0, 0, 1, 0, 0, 0, 0, 1])]),
        "skewed direction": _request(arrays=[_geometry_desc(direction=[1, 0.3, 0, 0, 1, 0, 0, 0, 1])]),
        "NaN in direction": _with_nan("[1, 0, 0, 0, 1, 0, 0, 0, 1]", "[NaN, 0, 0, 0, 1, 0, 0, 0, 1]"),
        "NaN origin": _with_nan("[0.0, 0.0, 0.0]", "[NaN, 0.0, 0.0]"),
        "margin a string": _request(arrays=[_image()], options={"margin_mm": "3"}),
        "ff_unit unknown": _request(arrays=[_image()], options={"ff_unit": {"a": 1}}),
        "cancel without target": _request("cancel"),
        "heartbeat target a list": _request("heartbeat", target=[1]),
        "id a number": [json.dumps({"protocol": 1, "op": "info", "id": 7}).encode()],
        "protocol a list": [json.dumps({"protocol": [1], "op": "info", "id": "a"}).encode()],
        "not UTF-8": [b"\xff\xfe\x00garbage"],
        "no frames after identity": [b""],
    }


@pytest.mark.parametrize("case", list(hostile_frontend_messages()))
def test_hostile_client_messages_are_refused_and_the_server_goes_on(hostile_server, case):
    t0 = time.monotonic()
    reply = raw_request(hostile_server["address"], hostile_frontend_messages()[case])
    assert reply["status"] == "error", reply
    assert reply["error"]["type"] in ("ProtocolError", "ProtocolVersionError"), reply
    assert time.monotonic() - t0 < 5  # refused before any work
    assert hostile_server["proc"].poll() is None
    assert InferenceClient(hostile_server["address"]).info()["workers"] == 1


def test_the_server_still_segments_correctly_after_the_hostile_messages(hostile_server, small_case, small_labels):
    for frames in hostile_frontend_messages().values():
        raw_request(hostile_server["address"], frames)
    assert_still_serves(hostile_server, small_case, small_labels)


def test_rogue_workers_get_no_scan_and_cannot_answer(hostile_server, small_case, small_labels, tmp_path):
    """Processes that connect to the backend port (no key, or a key the server does not know) and
    behave as workers, or send garbage: they never receive a request, and clients never see their
    replies."""
    ctx = zmq.Context.instance()
    rogues = []
    _, rogue_secret = zmq.auth.create_certificates(str(tmp_path), "rogue")
    for keyed in (False, True):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"rogue-{keyed}".encode())
        if keyed:
            public, secret = zmq.auth.load_certificate(rogue_secret)
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, zmq.curve_keypair()[0]
        sock.connect(hostile_server["backend"])
        rogues.append(sock)
    ready = json.dumps({"worker": "rogue", "pid": 1, "device": "cpu", "model": {"name": "liver-mr-t2"},
                        "classes": ["liver"]}).encode()
    forged = json.dumps({"protocol": 1, "id": "anything", "status": "ok", "readout": {"volumes_ml": {"liver": 99999}},
                         "classes": [], "arrays": []}).encode()
    garbage = [[b"READY", ready], [b"READY", b"{}"], [b"READY"], [b"\xff"], [b"REPLY", b"token", forged],
               [b"REPLY", b"not json"], [b"HEARTBEAT"]]
    for sock in rogues:
        for frames in garbage:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # no connection was ever allowed
    try:
        for _ in range(3):
            assert_still_serves(hostile_server, small_case, small_labels)
        info = InferenceClient(hostile_server["address"]).info()
        assert [w["name"] for w in info["worker_list"]] == ["worker-1"]  # no rogue registered
        for sock in rogues:
            assert not sock.poll(500), "a rogue worker received something"
    finally:
        for sock in rogues:
            sock.close()


def segment_in_threads(address, image, n: int) -> list:
    """Labels from n clients segmenting at once (an exception where one failed)."""
    results = [None] * n

    def work(i):
        try:
            with InferenceClient(address, idle_timeout_s=60) as client:
                results[i] = client.segment(image)[0].labels
        except Exception as exc:  # returned to the caller
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_a_cancel_after_the_last_progress_event_never_disturbs_other_requests(hostile_server, small_case,
                                                                              small_labels):
    """A client cancels right after its last progress event (so the cancel races the answer), and
    again after the answer; the requests after it are all served right."""
    image = small_case[0]
    for _ in range(3):
        cancel = threading.Event()
        with InferenceClient(hostile_server["address"]) as client:
            try:
                result, _ = client.segment(image, cancel=cancel,
                                           progress=lambda done, total, stage, c=cancel: done == total and c.set())
                np.testing.assert_array_equal(result.labels, small_labels)
            except CancelledError:
                pass  # the cancel came first: also a correct single final answer
            for _ in range(3):  # late cancels for a request that is already answered
                client._send_cancel(client.last_request_id)
        for labels in segment_in_threads(hostile_server["address"], image, 3):
            assert isinstance(labels, np.ndarray), labels
            np.testing.assert_array_equal(labels, small_labels)


def test_submits_with_bad_labels_are_refused_and_nothing_is_written_outside_the_queue(hostile_server, small_case):
    image = small_case[0]
    before = {p for p in hostile_server["folder"].rglob("*") if "queue" not in p.parts}
    good = (small_case[1] == 1).astype(np.uint8)
    with InferenceClient(hostile_server["address"]) as client:
        record = client.submit(image, good, {"study": "../../etc", "operator": "ana"})
        assert record["case_id"] == "etc_001"
        cases = [
            (np.where(good > 0, 255, 0).astype(np.uint8), None, r"\[255\] are not classes"),
            ((good * 0.5).astype(np.float32), None, "integers"),
            (good.astype(np.int16) - 1, None, "not classes"),
            (good, {"background": 7, "liver": "../../x"}, "background"),
            (good, {"liver": 1, "lesion": 2}, "holds cases labelled"),
        ]
        for label, table, message in cases:
            arrays = [encode_array("image", image.array.astype(np.float32), image.geometry),
                      encode_array("label", label, image.geometry)]
            with pytest.raises(RemoteError, match=message) as err:
                client.request("submit", arrays, {"meta": {"study": "bad"}, "labels": table})
            assert err.value.kind in ("QueueError", "ProtocolError")
        nan = np.full(image.array.shape, np.nan, np.float32)
        arrays = [encode_array("image", image.array.astype(np.float32), image.geometry),
                  encode_array("label", nan, image.geometry)]
        with pytest.raises(RemoteError, match="integers"):
            client.request("submit", arrays, {"meta": {}})
    assert [c["case_id"] for c in CaseQueue(hostile_server["queue"]).list()] == ["etc_001"]
    after = {p for p in hostile_server["folder"].rglob("*") if "queue" not in p.parts}
    assert after == before


def test_an_unwritable_queue_is_an_error_reply_naming_the_folder(tmp_path, small_case):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the queue folder should be")
    proc, address = start_server("--queue", blocked, workers=0)
    try:
        with InferenceClient(address) as client:
            with pytest.raises(RemoteError, match=str(blocked)) as err:
                client.submit(small_case[0], small_case[1] == 1)
            assert err.value.kind == "QueueError"
            assert client.info()["server_version"]
    finally:
        assert stop(proc) == 0


def test_cli_and_server_write_one_queue_at_once(hostile_server, small_case, tmp_path):
    """`liverseg queue add` in other processes and server submits on the same folder, together."""
    from LiverSegmentationLogic.io.volumes import write_labelmap

    image, reference = small_case
    files = []
    for i in range(3):
        shifted = Volume(image.array + i + 1, image.geometry)  # distinct images: distinct cases
        path = tmp_path / f"image{i}.nii.gz"
        write_labelmap(tmp_path / f"label{i}.nii.gz", reference == 1, image.geometry)
        sitk.WriteImage(shifted.to_sitk(), str(path))
        files.append((path, tmp_path / f"label{i}.nii.gz"))
    procs = [subprocess.Popen([sys.executable, "-m", "LiverSegmentationLogic.cli", "queue", "add", str(img), str(lab),
                               "--study", "cli", "--queue", str(hostile_server["queue"])], stderr=subprocess.PIPE,
                              text=True) for img, lab in files]
    with InferenceClient(hostile_server["address"]) as client:
        records = [client.submit(Volume(image.array + 10 + i, image.geometry), reference == 1, {"study": "srv"})
                   for i in range(3)]
    assert all(p.wait(120) == 0 for p in procs), [p.stderr.read() for p in procs]
    ids = [c["case_id"] for c in CaseQueue(hostile_server["queue"]).list()]
    assert {r["case_id"] for r in records} == {"srv_001", "srv_002", "srv_003"}
    assert {"cli_001", "cli_002", "cli_003"} <= set(ids) and len(ids) == len(set(ids))
    assert not list(hostile_server["queue"].rglob("*.partial*"))


def test_a_hung_worker_is_declared_dead_and_replaced(tmp_path, sample_case):
    image, _ = sample_case
    proc, address = start_server("--worker-timeout", WORKER_TIMEOUT_S, workers=1)
    try:
        wait_ready(address, 1)
        started, outcome = threading.Event(), {}

        def work():
            try:
                with InferenceClient(address, idle_timeout_s=60) as client:
                    client.segment(image, progress=lambda *e: started.set())
            except RemoteError as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        thread = threading.Thread(target=work)
        thread.start()
        assert started.wait(60)
        pid = InferenceClient(address).info()["worker_list"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)  # hangs: alive, silent
        stopped_at = time.monotonic()
        thread.join(60)
        assert outcome["error"].kind == "WorkerDiedError" and "no heartbeat" in outcome["error"].message
        assert outcome["at"] - stopped_at < WORKER_TIMEOUT_S + 3
        info = wait_ready(address, 1)
        assert info["worker_list"][0]["pid"] != pid and info["busy"] == 0
        with pytest.raises(ProcessLookupError):  # the hung process was killed, not left behind
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
    finally:
        assert stop(proc) == 0


def test_remote_workers_need_an_allowed_key_and_their_death_is_noticed(tmp_path, small_case, small_labels):
    """`liverseg worker` from 'another machine': it serves with an allowed key; when it dies mid-job
    its client gets WorkerDiedError promptly and it leaves the pool."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed-workers"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    clients = tmp_path / "allowed-clients"
    clients.mkdir()
    client_public, client_secret = zmq.auth.create_certificates(str(clients), "operator")
    worker_public, worker_secret = zmq.auth.create_certificates(str(keys), "gpu-box")
    os.replace(worker_public, allowed / "gpu-box.key")
    _, unknown_secret = zmq.auth.create_certificates(str(keys), "unknown")
    backend = f"tcp://127.0.0.1:{free_port()}"
    proc, address = start_server("--backend", backend, "--curve-secret", server_secret, "--curve-clients", clients,
                                 "--curve-workers", allowed, "--worker-timeout", WORKER_TIMEOUT_S, workers=0)

    def worker(cert):
        return subprocess.Popen([sys.executable, "-m", "LiverSegmentationLogic.cli", "worker", "--connect", backend,
                                 "--server-key", server_public, "--worker-cert", cert, "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    server_key = zmq.auth.load_certificate(server_public)[0]

    def client(**kw):
        return InferenceClient(address, curve_server_key=server_key, curve_client_cert=client_secret, **kw)

    intruder = worker(unknown_secret)
    good = worker(worker_secret)
    try:
        deadline = time.monotonic() + 60
        while client().info()["workers"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        info = client().info()
        assert info["workers"] == 1 and info["worker_list"][0]["pid"] == good.pid  # not the intruder
        with client(idle_timeout_s=60) as c:
            np.testing.assert_array_equal(c.segment(small_case[0])[0].labels, small_labels)
        started, outcome = threading.Event(), {}

        def work():
            try:
                with client(idle_timeout_s=60) as c:
                    c.segment(small_case[0], progress=lambda *e: started.set())
            except RemoteError as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        thread = threading.Thread(target=work)
        thread.start()
        assert started.wait(60)
        good.kill()
        killed_at = time.monotonic()
        thread.join(60)
        assert outcome["error"].kind == "WorkerDiedError"
        assert outcome["at"] - killed_at < WORKER_TIMEOUT_S + 3
        assert client().info()["workers"] == 0
    finally:
        for p in (intruder, good):
            p.kill()
            p.wait()
        assert stop(proc) == 0


def test_admission_control_refuses_floods_clearly(tmp_path):
    """No worker: requests wait. The fourth from one client and the sixth in all are refused."""
    proc, address = start_server("--max-queued", 5, "--max-queued-per-client", 3, "--client-timeout", 30, workers=0)
    ctx = zmq.Context.instance()
    sockets = [ctx.socket(zmq.DEALER) for _ in range(2)]
    try:
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)

        def send(sock, n):
            desc, buf = encode_array("image", TINY, Geometry.identity())
            sock.send_multipart(pack({"protocol": 1, "op": "segment", "id": f"r{n}", "arrays": [desc]}, [buf]))
            while True:  # skip the "queued" events of the earlier requests
                assert sock.poll(5000)
                reply = json.loads(sock.recv_multipart()[0])
                if reply["id"] == f"r{n}":
                    return reply

        replies = [send(sockets[0], n) for n in range(4)]
        assert [r.get("event") for r in replies[:3]] == ["accepted"] * 3
        assert replies[3]["error"]["type"] == "ServerBusy" and "retry later" in replies[3]["error"]["message"]
        replies = [send(sockets[1], n) for n in range(3)]
        assert [r.get("event") for r in replies[:2]] == ["accepted"] * 2
        assert replies[2]["error"]["type"] == "ServerBusy" and "5 requests waiting" in replies[2]["error"]["message"]
        assert InferenceClient(address).info()["queued"] == 5
    finally:
        for sock in sockets:
            sock.close()
        assert stop(proc) == 0


def test_geometry_is_checked_locally_too():
    """The same checks guard local inference: a broken header is a clear InvalidImageError."""
    from LiverSegmentationLogic.inference.preprocessing import MAX_MODEL_GRID, model_grid_size
    from LiverSegmentationLogic.models.preprocess_config import PreprocessConfig

    for geometry, message in [
        (Geometry((150.0, 150.0, 150.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), "outside"),
        (Geometry((1.0, 1.0, 1.0), (np.nan, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), "NaN"),
        (Geometry((1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 1, 0, 0, 0, 0, 1)), "orthonormal"),
    ]:
        with pytest.raises(InvalidImageError, match=message):
            validate_volume(Volume(TINY, geometry))
    config = PreprocessConfig.from_dict({"spacing_xy": [1.5, 1.5], "neighbours": 1,
                                          "intensity": {"method": "percentile", "lower": 1, "upper": 99}})
    with pytest.raises(InvalidImageError, match=f"at most {MAX_MODEL_GRID}"):
        model_grid_size((3, 64, 64), (5.0, 40.0, 40.0), config)



def test_soak_mixed_valid_invalid_and_cancelled_requests_from_six_clients(tmp_path, small_case, small_labels):
    """About 200 requests from 6 clients at once, in under 3 minutes: every valid one correct, every
    invalid one refused with a clear error, every cancelled one answered; the broker's memory back
    near its warm level, and nothing written outside the queue."""
    psutil = pytest.importorskip("psutil")
    image, reference = small_case
    liver = (reference == 1).astype(np.uint8)
    queue = tmp_path / "queue"
    proc, address = start_server("--queue", queue, "--max-message-mb", 24, cwd=tmp_path, workers=2)
    broker = psutil.Process(proc.pid)
    hostile = list(hostile_frontend_messages().values())
    try:
        wait_ready(address, 2)
        with InferenceClient(address, idle_timeout_s=60) as client:  # warm up every path once
            for i in range(2):
                client.segment(image)
                client.submit(Volume(image.array + 1000 + i, image.geometry), liver, {"study": "warm"})
            for frames in hostile:
                raw_request(address, frames)
        time.sleep(1)
        warm_rss = broker.memory_info().rss
        files_before = {p for p in tmp_path.rglob("*") if queue not in p.parents and p != queue}
        failures, counts = [], {"segment": 0, "info": 0, "submit": 0, "invalid": 0, "cancelled": 0}
        lock = threading.Lock()

        def run_client(index: int):
            rng = np.random.default_rng(index)
            plan = ["segment"] * 5 + ["info"] * 8 + ["submit"] * 4 + ["invalid"] * 14 + ["cancelled"] * 3
            rng.shuffle(plan)
            with InferenceClient(address, idle_timeout_s=60) as client:
                for step, kind in enumerate(plan):
                    try:
                        if kind == "segment":
                            np.testing.assert_array_equal(client.segment(image)[0].labels, small_labels)
                        elif kind == "info":
                            assert client.info()["workers"] == 2
                        elif kind == "submit":
                            shifted = Volume(image.array + 100 * index + step, image.geometry)
                            assert client.submit(shifted, liver, {"study": f"c{index}"})["case_id"].startswith(
                                f"c{index}_")
                        elif kind == "invalid":
                            reply = raw_request(address, hostile[int(rng.integers(len(hostile)))])
                            assert reply["status"] == "error" and reply["error"]["message"], reply
                        else:
                            cancel = threading.Event()
                            try:
                                labels = client.segment(image, cancel=cancel, progress=lambda *e, c=cancel: c.set())
                                np.testing.assert_array_equal(labels[0].labels, small_labels)
                            except CancelledError:
                                pass
                        with lock:
                            counts[kind] += 1
                    except Exception as exc:  # collected: one failure must not hide the others
                        with lock:
                            failures.append(f"client {index} {kind}: {type(exc).__name__}: {exc}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        elapsed = time.monotonic() - t0
        assert not failures, failures[:10]
        assert sum(counts.values()) == 6 * 34 and elapsed < 180, (counts, elapsed)
        time.sleep(2)
        growth_mb = (broker.memory_info().rss - warm_rss) / 2**20
        print(f"soak: {sum(counts.values())} requests {counts} in {elapsed:.1f}s; broker memory "
              f"{warm_rss / 2**20:.0f} MB warm, {growth_mb:+.1f} MB after")
        assert growth_mb < 50, f"broker memory grew {growth_mb:.0f} MB over its warm level"
        files_after = {p for p in tmp_path.rglob("*") if queue not in p.parents and p != queue}
        assert files_after == files_before, files_after ^ files_before
        assert len(CaseQueue(queue).list()) == 2 + 6 * 4
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        assert not [line for line in proc.log if "unexpected failure" in line]
