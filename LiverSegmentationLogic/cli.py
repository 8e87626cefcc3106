"""The ``liverseg`` command: segment, batch, evaluate, demo, serve, worker, keys, queue, tasks, train, finetune,
models."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .errors import LiverSegError


class _ProgressBar:
    """A tqdm bar on stderr driven by the core's progress(done, total, stage) callback."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def __call__(self, done: int, total: int, stage: str):
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=stage, unit="slice", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _ProgressLines:
    """Machine-readable progress on stdout ("PROGRESS done total stage"), for a parent process."""

    def __call__(self, done: int, total: int, stage: str):
        print(f"PROGRESS {done} {total} {stage}", flush=True)

    def close(self):
        pass


def cmd_review(args) -> int:
    import secrets
    import socket

    from .remote.client import curve_options

    if (args.curve_server_key or args.curve_client_cert) and not args.server:
        print("error: CurveZMQ keys are for a server: add --server", file=sys.stderr)
        return 2
    curve_options(args.curve_server_key, args.curve_client_cert)  # checked before serving anything
    try:
        from LiverSegmentationReview.app import serve
    except ImportError as exc:
        print(f"error: liverseg review needs the review extra ({exc}): pip install -e \".[review]\"", file=sys.stderr)
        return 2
    study = Path(args.study).resolve()
    if not study.is_dir():
        print(f"error: {study} is not a folder", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else study.with_name(study.name + "-results")
    settings = {"backend": "Remote" if args.server else "Local", "study": args.study_tag,
                "operatorName": args.operator}
    if args.server:
        settings.update(serverAddress=args.server, serverKeyFile=args.curve_server_key,
                        clientCertFile=args.curve_client_cert)
    if args.model:
        settings["model"] = args.model
    if args.queue:
        settings["queueFolder"] = str(Path(args.queue).resolve())
    host, token = ("0.0.0.0", secrets.token_urlsafe(24)) if args.network else ("127.0.0.1", None)
    if args.network:
        print("warning: serving every network interface; anyone with the address below (and its token) can see "
              "and change this study's results", file=sys.stderr)

    def announce(port):
        where = socket.gethostname() if args.network else "127.0.0.1"
        print(f"review of {study} (results in {out}) at http://{where}:{port}/"
              + (f"?secret={token}" if token else ""), flush=True)

    return serve(study, out, settings, port=args.port, host=host, token=token, on_ready=announce)


def cmd_batch(args) -> int:
    from tqdm import tqdm

    import uuid

    from .studies.batch import find_cases, local_segment, run_batch

    total = len(find_cases(Path(args.study)))
    if total == 0:
        raise LiverSegError(f"No scans (NIfTI, NRRD, MHA or DICOM folders) found under {args.study}")
    bar = tqdm(total=total, unit="case", file=sys.stderr, disable=args.quiet)
    counts = {"in flight": 0, "failed": 0}
    remote = None
    if args.server:
        from .remote.batch_client import RemoteSegment

        with _client(args) as probe:
            workers = int(probe.info()["workers"])
        in_flight = args.in_flight or max(1, workers)
        session = f"batch-{uuid.uuid4().hex[:12]}"  # the batch's sockets are one client for the server
        remote = segment = RemoteSegment(lambda: _client(args, session), study=args.model_study,
                                         margin_mm=args.margin_mm,
                                         log=lambda line: bar.write(line, file=sys.stderr))
        bar.write(f"{args.server}: {workers} worker(s), {in_flight} case(s) in flight", file=sys.stderr)
    else:
        in_flight = args.in_flight or 1
        segment = local_segment(_load_segmenter(args))

    def show():
        retried = f", {remote.retried} retried" if remote is not None and remote.retried else ""
        bar.set_postfix_str(f"{counts['in flight']} in flight, {counts['failed']} failed{retried}")

    def on_start(case):
        counts["in flight"] += 1
        show()

    def on_case(row):
        if not row["status"].startswith("done (skipped"):
            counts["in flight"] -= 1
        counts["failed"] += row["status"].startswith("failed")
        show()
        bar.update(1)
        review = f" - needs review: {row['quality_reasons']}" if row.get("quality") == "needs review" else ""
        bar.write(f"{row['case']}: {row['status']}{review}", file=sys.stderr)

    try:
        rows = run_batch(Path(args.study), Path(args.output), segment, on_case=on_case, in_flight=in_flight,
                         on_start=on_start)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: the cases in flight were cancelled; finished ones are kept in {args.output} "
              "(run the same command again to go on)", file=sys.stderr)
        raise
    finally:
        if remote is not None:
            remote.close()
    bar.close()
    failed = [r for r in rows if r["status"].startswith("failed")]
    flagged = [r for r in rows if r.get("quality") == "needs review"]
    print(f"{len(rows)} case(s): {len(rows) - len(failed)} done ({len(flagged)} need review), {len(failed)} failed; "
          f"table (cases needing attention first): {Path(args.output) / 'results.csv'}")
    return 1 if failed else 0


def _load_segmenter(args):
    from .inference.segmenter import Segmenter
    from .models.model_files import load_model

    return Segmenter(load_model(args.model, study=args.model_study), device=args.device, batch_size=args.batch_size,
                     precision=args.precision)


def cmd_segment(args) -> int:
    from .readouts.audit import write_audit
    from .io.volumes import read_volume, split_image_suffix
    from .inference.pipeline import format_readout, segment_case, write_segmentation

    channels = [read_volume(path) for path in args.input]
    ff_map = read_volume(args.ff, validate=False) if args.ff else None
    progress = _ProgressLines() if args.progress_lines else _ProgressBar(not args.quiet)
    options = dict(margin_mm=args.margin_mm, ff_unit=args.ff_unit, progress=progress)
    try:
        if args.server:
            with _client(args) as client:
                result, readout = client.segment(channels, ff_map, study=args.model_study, **options)
            readout["audit"]["input"]["source"] = str(args.input[0])
        else:
            result, readout = segment_case(_load_segmenter(args), channels, ff_map, source=str(args.input[0]),
                                           **options)
    finally:
        progress.close()
    written = write_segmentation(args.output, result)
    audit = write_audit(written.with_name(split_image_suffix(written.name)[0] + ".audit.json"), readout["audit"])
    print(format_readout(readout))
    check = readout["review"]["slices_to_check"]
    print(f"slices to check (axial, most uncertain first): {', '.join(map(str, check)) or 'none'}")
    print(f"segmentation written to {written}\naudit record written to {audit}")
    if args.png:
        from .inference.overlay import overlay_mosaic  # Pillow only when a mosaic is asked for

        print(f"QA mosaic written to {overlay_mosaic(channels[0], result.labels, result.classes, args.png)}")
    if args.json:
        Path(args.json).write_text(json.dumps(readout, indent=2) + "\n")
        print(f"readout written to {args.json}")
    return 0


def _client(args, session=None):
    from .remote.client import InferenceClient, curve_options

    curve = curve_options(args.curve_server_key, args.curve_client_cert)
    return InferenceClient(args.server, connect_timeout_s=args.timeout, session=session, **curve)


def cmd_serve(args) -> int:
    import logging

    from .remote.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(
        bind=args.bind,
        workers=args.workers,
        model=args.model,
        device=args.device,
        backend=args.backend,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        curve_secret_file=args.curve_secret,
        curve_clients_dir=args.curve_clients,
        curve_workers_dir=args.curve_workers,
        client_timeout_s=args.client_timeout,
        worker_timeout_s=args.worker_timeout,
        queue_dir=args.queue,
        curve_trainers_dir=args.curve_trainers,
        replay_dir=args.replay,
        auto_finetune_every=args.auto_finetune,
        finetune_budget_s=args.finetune_budget,
        max_queued=args.max_queued,
        max_queued_per_client=args.max_queued_per_client,
        max_queued_bytes=int(args.max_queued_mb * 2**20) if args.max_queued_mb else None,
    )
    return 0


def cmd_worker(args) -> int:
    import logging

    from .remote.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker(args.connect, args.server_key, args.worker_cert, model=args.model, device=args.device,
               name=args.name, threads=args.threads, max_message_bytes=int(args.max_message_mb * 2**20))
    return 0


def cmd_keys(args) -> int:
    import zmq.auth

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), args.name)
    print(f"public key (share it): {public}\nsecret key (keep it private): {secret}")
    return 0


def cmd_queue(args) -> int:
    from .studies.case_queue import CaseQueue
    from .io.volumes import read_volume

    if args.action == "add":
        from .models.tasks import load_task

        task = load_task(args.task)
        queue = CaseQueue(args.queue, labels={c["name"]: c["label"] for c in task.class_entries()},
                          modality=task.spec.get("modality") or None)
        image = read_volume(args.image)
        label = np.rint(read_volume(args.label, validate=False).array).astype(np.uint8)
        record = queue.add(image, label, {"study": args.study, "source": str(args.image), "operator": args.operator},
                           on_duplicate=args.on_duplicate)
        print(f"queued {record['case_id']}" + (" (replaced the earlier export)" if record["replaced"] else ""))
    elif args.action == "list":
        queue = CaseQueue(args.queue)
        cases = queue.list()
        for m in cases:
            print(f"{m['case_id']:<24} {m.get('study') or '-':<16} {m['exported']}  {m.get('source', '')}")
        print(f"{len(cases)} case(s) in {queue.folder}")
    else:
        queue = CaseQueue(args.queue)
        try:
            queue.remove(args.case)
        except KeyError as exc:
            raise LiverSegError(exc.args[0]) from exc
        print(f"removed {args.case}")
    return 0


def cmd_tasks(args) -> int:
    from .models.catalog import active_models
    from .models.tasks import list_tasks

    active = active_models()
    for task in list_tasks():
        model = active.get(task.name)
        classes = ", ".join(c["name"] for c in task.class_entries())
        cascade = f"; cascade after {task.cascade['roi_task']}" if task.cascade else ""
        print(f"{task.name:<24} {task.spec.get('modality', ''):<3} in: {', '.join(task.channels)}; "
              f"classes: {classes}{cascade}; model: {model.ref if model else 'none (train one)'}")
        if args.verbose:
            print(f"    {task.spec.get('description', '')}\n    file: {task.path}")
    return 0


def cmd_train(args) -> int:
    from .training.task_training import train_task
    from .models.tasks import load_task

    task = load_task(args.task)
    train_task(
        task,
        args.datasets,
        output=Path(args.output) if args.output else None,
        version=args.version,
        epochs=args.epochs,
        time_budget_s=args.time_budget,
        validation=args.validation,
        folds=args.folds,
        seed=args.seed,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        activate=True if args.activate else None,
        device=args.device,
        precision=args.precision,
    )
    return 0


def cmd_finetune(args) -> int:
    from .training.finetuning import finetune

    result = finetune(
        args.base,
        args.queue,
        replay=args.replay,
        replay_cases=args.replay_cases,
        epochs=args.epochs,
        time_budget_s=args.time_budget,
        learning_rate=args.learning_rate,
        tolerance=args.tolerance,
        seed=args.seed,
        device=args.device,
        study=args.study,
    )
    return 0 if result.promoted else 3


def cmd_models(args) -> int:
    from .models.catalog import activate, active_models, find_model, list_models, rollback, study_tag

    where = f" for study {study_tag(args.study)}" if args.study else ""
    if args.action == "list":
        active = {m.folder for m in active_models(args.study).values()}
        for e in list_models():
            flag = "*" if e.folder in active else " "
            dice = e.card.get("validation", {}).get("mean_dice", {})
            scores = ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
            note = e.card.get("promotion", {})
            status = "" if not note else (" promoted" if note.get("promoted") else " NOT promoted")
            print(f"{flag} {e.ref:<36} {'bundled' if e.bundled else 'registry':<8}{status}  {scores}")
        print(f"* = active{where}")
    elif args.action == "activate":
        entry = activate(args.model, study=args.study)
        print(f"{entry.name}: {find_model(entry.name, args.study).ref} is now active{where}")
    elif args.action == "rollback":
        entry = rollback(args.model, study=args.study)
        print(f"{entry.name}: back to {entry.ref}{where}")
    else:
        entry = find_model(args.model, args.study)
        print(json.dumps({"ref": entry.ref, "folder": str(entry.folder), **entry.card}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .errors import InvalidImageError
    from .io.volumes import read_volume
    from .readouts.metrics import segmentation_metrics

    pred = read_volume(args.prediction, validate=False)
    ref = read_volume(args.reference, validate=False)
    if pred.array.shape != ref.array.shape:
        raise InvalidImageError(f"prediction shape {pred.array.shape} differs from reference shape {ref.array.shape}")
    if not pred.geometry.allclose(ref.geometry, tol=1e-3):
        print("warning: prediction and reference geometries differ; comparing voxel by voxel", file=sys.stderr)
    spacing_zyx = ref.geometry.spacing[::-1]
    p, r = np.rint(pred.array).astype(int), np.rint(ref.array).astype(int)
    metrics = segmentation_metrics(p == args.label, r == args.label, spacing_zyx)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(map(len, metrics))
        for k, v in metrics.items():
            print(f"{k.ljust(width)}  {v:.4f}")
    return 0


def cmd_demo(args) -> int:
    from .io.volumes import Volume, read_volume
    from .readouts.metrics import dice
    from .inference.pipeline import format_readout, segment_case, write_segmentation
    from .inference.overlay import overlay_mosaic
    from .readouts.measurements import dixon_fat_fraction
    from .io.sample import SAMPLE_NAME, sample_paths

    image_path, label_path = sample_paths()
    volume = read_volume(image_path)
    reference = np.rint(read_volume(label_path, validate=False).array).astype(int) == 1
    # The sample has no Dixon scan, so a synthetic opposed-phase image with a known 12 % liver fat
    # (inside the reference liver) demonstrates the fat-fraction path: the readout should say ~12 %.
    opposed = volume.array.astype(np.float32) * np.where(reference, 1 - 2 * 0.12, 1.0)
    ff_map = dixon_fat_fraction(volume, Volume(opposed, volume.geometry))
    segmenter = _load_segmenter(args)
    progress = _ProgressBar(not args.quiet)
    try:
        result, readout = segment_case(segmenter, volume, ff_map, margin_mm=args.margin_mm, progress=progress)
    finally:
        progress.close()
    out = Path(args.output)
    seg_path = write_segmentation(out / f"{SAMPLE_NAME}.seg.nrrd", result)
    png = overlay_mosaic(volume, result.labels, result.classes, out / f"{SAMPLE_NAME}_qa.png")
    print(f"sample: {SAMPLE_NAME} (CHAOS MR T2-SPIR, CC BY-SA 4.0, Kavur et al. 2021)")
    print(format_readout(readout))
    print("  (PDFF from a synthetic Dixon pair with 12 % fat in the reference liver: the sample has no Dixon scan)")
    print(f"liver Dice vs reference  {dice(result.labels == 1, reference):.4f}")
    print(f"segmentation written to {seg_path}\nQA mosaic written to {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liverseg", description="Liver segmentation, volume and fat-fraction readouts."
    )
    parser.add_argument("--version", action="version", version=f"liverseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--model", default=None,
                       help="model name (its active version), name@version, folder or model_card.json "
                            "(default: liver-mr-t2)")
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1...")
        p.add_argument("--study", dest="model_study", default=None,
                       help="study / site tag: a model name resolves to the version active for that study")
        p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
        p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="arithmetic of the network: auto = bf16 on CPUs that have it natively for models "
                            "validated in bf16 (see the model card), else fp32")
        p.add_argument("--margin-mm", type=float, default=3.0, help="erosion from the liver border for PDFF")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def server_options(p):
        p.add_argument("--server", help="run on a remote inference server, e.g. tcp://gpu-host:5555")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server's first answer")
        p.add_argument("--curve-server-key", help="the server's public certificate (CurveZMQ)")
        p.add_argument("--curve-client-cert", help="this client's secret certificate (CurveZMQ)")

    p = sub.add_parser("segment", help="segment a scan and print the readouts")
    p.add_argument("input", nargs="+",
                   help="NIfTI/NRRD/MHA file or DICOM series folder; one per channel for multi-channel tasks")
    p.add_argument("-o", "--output", required=True, help="output .seg.nrrd, .nrrd, .nii.gz or .mha")
    p.add_argument("--ff", help="fat-fraction (PDFF) map, any grid")
    p.add_argument("--ff-unit", choices=["auto", "percent", "fraction"], default="auto")
    p.add_argument("--png", help="write a QA mosaic PNG here")
    p.add_argument("--json", help="write the readouts as JSON here")
    server_options(p)
    p.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS done total stage' lines")
    model_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("serve", help="run the ZeroMQ inference server")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="client address (loopback by default)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument("--backend", help="address workers connect to (default: a random loopback port)")
    p.add_argument("--max-message-mb", type=float, default=1024, help="larger requests are refused")
    p.add_argument("--curve-secret", help="server secret certificate (from 'liverseg keys'): enables CurveZMQ")
    p.add_argument("--curve-clients", help="folder of allowed client public certificates")
    p.add_argument("--queue", help="fine-tuning queue folder that clients may submit corrected cases to")
    p.add_argument("--client-timeout", type=float, default=10.0,
                   help="seconds without a client heartbeat before its request is abandoned")
    p.add_argument("--curve-workers", help="folder of public certificates of workers allowed to connect "
                   "from other machines (needs --curve-secret)")
    p.add_argument("--worker-timeout", type=float, default=10.0,
                   help="seconds without a worker heartbeat before it is declared dead")
    p.add_argument("--curve-trainers", help="public certificates of the clients allowed to start fine-tuning and "
                   "change the active model (needs --curve-secret); without it nobody may")
    p.add_argument("--replay", help="the base model's training data, for fine-tuning's replay and validation gate")
    p.add_argument("--auto-finetune", type=int, default=0, metavar="K",
                   help="fine-tune a study's model line after every K queued cases of it (default 0: off)")
    p.add_argument("--finetune-budget", type=float, default=300.0,
                   help="seconds per automatic fine-tune, all steps included")
    p.add_argument("--max-queued", type=int, default=32, help="requests waiting for a worker, all clients")
    p.add_argument("--max-queued-per-client", type=int, default=4, help="requests waiting, per client")
    p.add_argument("--max-queued-mb", type=float, default=None,
                   help="bytes of requests waiting, all clients (default 4 x --max-message-mb)")
    p.add_argument("--model", default=None, help="model name, folder or model_card.json")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="serve a remote inference server's requests from this machine")
    p.add_argument("--connect", required=True, help="the server's backend address, e.g. tcp://server:5556")
    p.add_argument("--server-key", required=True, help="the server's public certificate (NAME.key)")
    p.add_argument("--worker-cert", required=True,
                   help="this worker's secret certificate (NAME.key_secret); its public half goes into the "
                   "server's --curve-workers folder")
    p.add_argument("--name", default=None, help="worker name (default: host-pid)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-message-mb", type=float, default=1024, help="as the server's")
    p.add_argument("--model", default=None, help="model name, folder or model_card.json")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="make a CurveZMQ key pair (NAME.key and NAME.key_secret)")
    p.add_argument("folder")
    p.add_argument("--name", default="server")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("batch", help="segment every scan of a study folder; resumable")
    p.add_argument("study", help="folder searched recursively for NIfTI/NRRD/MHA files and DICOM folders")
    p.add_argument("-o", "--output", required=True, help="results folder (per-case folders + results.csv)")
    server_options(p)
    p.add_argument("--in-flight", type=int, default=0, metavar="N",
                   help="cases worked on at once (default: the server's worker count; 1 locally)")
    model_options(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("review", help="review and correct a study's cases in the browser (needs the [review] extra)")
    p.add_argument("study", help="folder of scans, as for batch")
    p.add_argument("-o", "--output", default=None,
                   help="results folder (batch results are shown, reviews written beside them; "
                        "default: STUDY-results next to the study)")
    p.add_argument("--server", help="segment on this inference server, e.g. tcp://gpu-host:5555")
    p.add_argument("--curve-server-key", default="", help="the server's public certificate (CurveZMQ)")
    p.add_argument("--curve-client-cert", default="", help="this operator's secret certificate (CurveZMQ)")
    p.add_argument("--queue", default=None, help="fine-tuning queue folder (a folder per task is made in it)")
    p.add_argument("--model", default=None, help="model name for local segmentation (default: liver-mr-t2)")
    p.add_argument("--study-tag", default="", help="study / site tag recorded with the cases and their model line")
    p.add_argument("--operator", default="", help="operator name recorded with accepted cases")
    p.add_argument("--port", type=int, default=8080, help="web page port (0: any free port)")
    p.add_argument("--network", action="store_true",
                   help="serve every network interface, not only this machine (the address then carries a token)")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("queue", help="the fine-tuning queue of corrected cases")
    qsub = p.add_subparsers(dest="action", required=True)
    q = qsub.add_parser("add", help="queue an image and its corrected label")
    q.add_argument("image")
    q.add_argument("label")
    q.add_argument("--study", default=None, help="study / scanner tag")
    q.add_argument("--operator", default=None)
    q.add_argument("--on-duplicate", choices=["replace", "version"], default="replace")
    q.add_argument("--task", default="liver-mr-t2",
                   help="the task whose classes the label holds (default liver-mr-t2); a queue holds one task")
    qsub.add_parser("list", help="list queued cases")
    q = qsub.add_parser("remove", help="remove a queued case")
    q.add_argument("case")
    for action in qsub.choices.values():
        action.add_argument("--queue", default="liverseg-queue", help="queue folder (default ./liverseg-queue)")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("tasks", help="list the segmentation tasks and their active models")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("train", help="train a task's model on labelled datasets")
    p.add_argument("datasets", nargs="+", help="dataset folders (nnU-Net imagesTr/labelsTr, or image_N + label_N)")
    p.add_argument("--task", required=True, help="task name (see 'liverseg tasks') or task file")
    p.add_argument("-o", "--output", help="model folder (default: a new version in the registry)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--epochs", type=int, help="default: the task's")
    p.add_argument("--time-budget", type=float, help="seconds of training at most")
    p.add_argument("--validation", nargs="*", help="case names to hold out (default: the task's, else a fifth)")
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation (k trainings) for the metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="checkpoint file: written each epoch, resumed from if present")
    p.add_argument("--activate", action="store_true", help="make the new version active")
    p.add_argument("--device", default="auto", help="where to train: auto (CUDA if present), cpu, cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the forward pass under bf16 autocast, faster on CPUs with bf16 in hardware "
                        "(see benchmarks/bench_training.py); a checkpoint resumes only in its own precision")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on the queue; activate it only if it validates")
    p.add_argument("--base", default=None, help="model to start from (default: the active liver-mr-t2)")
    p.add_argument("--queue", default="liverseg-queue", help="queue folder (default ./liverseg-queue)")
    p.add_argument("--replay", help="the base model's training dataset: replay cases + regression check")
    p.add_argument("--replay-cases", type=int, help="replay cases mixed in (default: as many as queued, >= 2)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds for the whole fine-tune: reading, training and the validation gate (default 300)")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--tolerance", type=float, default=0.02, help="largest allowed Dice loss on the base validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="where to train: auto (CUDA if present), cpu, cuda")
    p.add_argument("--study", default=None, help="fine-tune this study's model line on its queued cases only")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("models", help="the model registry: list, activate, rollback, info (globally or per study)")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="every model version; * marks the active one of each name")
    m = msub.add_parser("activate", help="make name@version the active version of its name (name@bundled-version "
                        "clears the choice)")
    m.add_argument("model")
    m = msub.add_parser("rollback", help="undo the last activation of a model name")
    m.add_argument("model", help="model name")
    m = msub.add_parser("info", help="print a model's card")
    m.add_argument("model", help="name (active version) or name@version")
    for action in msub.choices.values():
        action.add_argument("--study", default=None, help="a study / site's model line instead of the global choice")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("evaluate", help="compare a segmentation with a reference")
    p.add_argument("prediction")
    p.add_argument("reference")
    p.add_argument("--label", type=int, default=1, help="label value to compare (default 1, liver)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="run the default model on the bundled sample case")
    p.add_argument("-o", "--output", default="liverseg-demo-output", help="folder for the results")
    model_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LiverSegError as exc:
        print(f"liverseg: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values reported by the core's validation
        print(f"liverseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liverseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
