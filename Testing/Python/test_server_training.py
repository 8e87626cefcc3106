"""Fine-tuning and model versions on the server: trainers only, in a process of its own, cancellable,
never changing the active version unless it validated."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq.auth

from LiverSegmentationLogic.errors import RemoteError
from LiverSegmentationLogic.io.volumes import crop_volume
from LiverSegmentationLogic.models import catalog
from LiverSegmentationLogic.remote.client import InferenceClient
from server_helpers import operator_and_trainer_keys, start_server, stop
from test_study_models import register_study_version


@pytest.fixture()
def keyed_server(home, tmp_path):
    """A CurveZMQ server with a queue; 'ana' is an operator, 'lea' also a trainer."""
    options, files = operator_and_trainer_keys(tmp_path)
    ana, lea = files["ana"], files["lea"]
    proc, address = start_server(*options, "--queue", tmp_path / "queue", "--auto-finetune", 2, workers=1)
    server_key = zmq.auth.load_certificate(files["server"])[0]

    def client(cert):
        return InferenceClient(address, curve_server_key=server_key, curve_client_cert=cert, idle_timeout_s=60)

    try:
        yield {"operator": lambda: client(ana), "trainer": lambda: client(lea), "proc": proc}
    finally:
        assert stop(proc) == 0


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError


def test_only_trainers_change_models_and_a_study_gets_its_version(keyed_server, sample_case):
    version = register_study_version("TRIAL7")
    small = crop_volume(sample_case[0], (slice(14, 20), slice(None), slice(None)))
    with keyed_server["operator"]() as ana:
        assert any(m["ref"] == f"liver-mr-t2@{version}" for m in ana.models(study="TRIAL7"))
        for call in (lambda: ana.activate(f"liver-mr-t2@{version}", study="TRIAL7"),
                     lambda: ana.train(study="TRIAL7"), ana.train_cancel,
                     lambda: ana.rollback("liver-mr-t2", study="TRIAL7")):
            with pytest.raises(RemoteError, match="only trainers") as err:
                call()
            assert err.value.kind == "NotAllowed"
    assert catalog.active_model("liver-mr-t2", "TRIAL7").version == version.split("+")[0]  # nothing changed
    with keyed_server["trainer"]() as lea:
        wait_ready_client(lea)
        assert lea.activate(f"liver-mr-t2@{version}", study="TRIAL7") == f"liver-mr-t2@{version}"
        assert lea.segment(small, study="TRIAL7")[1]["model"]["version"] == version  # the next request uses it
        assert lea.segment(small)[1]["model"]["version"] == version.split("+")[0]
        assert lea.rollback("liver-mr-t2", study="TRIAL7") == "liver-mr-t2@" + version.split("+")[0]
    assert catalog.active_model("liver-mr-t2", "TRIAL7").version == version.split("+")[0]


def _finetune_processes() -> list:
    psutil = pytest.importorskip("psutil")
    return [p for p in psutil.process_iter(["cmdline"]) if "finetune" in (p.info["cmdline"] or [])]


def wait_ready_client(client):
    wait_for(lambda: client.info()["workers"] >= 1, timeout=120)


def test_a_training_runs_apart_reports_and_is_cancelled_without_changing_anything(keyed_server, sample_case):
    image, reference = sample_case
    before = catalog.active_model("liver-mr-t2").ref
    with keyed_server["trainer"]() as lea:
        failed = lea.train(study="EMPTY", time_budget_s=10)  # no queued case of that study
        status = wait_for(lambda: (s := lea.train_status())["state"] != "running" and s)
        assert status["id"] == failed["id"] and status["state"] == "failed"
        assert any("holds no cases" in line for line in status["log"]), status["log"]
        lea.submit(image, reference == 1, {"study": "S1", "operator": "lea"})
        lea.submit(crop_volume(image, (slice(2, 30), slice(None), slice(None))), (reference == 1)[2:30],
                   {"study": "S1", "operator": "lea"})  # the second case of S1 starts the automatic fine-tune
        running = wait_for(lambda: (s := lea.train_status())["id"] != failed["id"] and s)
        assert running["study"] == "S1" and running["state"] == "running"
        with pytest.raises(RemoteError, match="already running"):
            lea.train(study="S1")
        wait_for(lambda: lea.train_status()["epoch"] >= 1 or None, timeout=120)  # it trains while...
        np.testing.assert_array_equal(lea.segment(crop_volume(image, (slice(14, 16), slice(None), slice(None))))[0]
                                      .labels.shape, (2, 256, 256))  # ...the workers go on serving
        assert lea.train_cancel()["state"] == "cancelled"
        pid_gone = wait_for(lambda: keyed_server["proc"].poll() is None and not _finetune_processes() or None)
        assert pid_gone
    assert catalog.active_model("liver-mr-t2").ref == before
    assert catalog.active_model("liver-mr-t2", "S1").ref == before
