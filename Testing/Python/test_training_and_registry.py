"""Training, fine-tuning with validation before promotion, and the model registry, on real data."""

import json
import os
import shutil
import time

import numpy as np
import pytest
from scipy import ndimage

from LiverSegmentationLogic.models import catalog
from LiverSegmentationLogic.studies.case_queue import CaseQueue
from LiverSegmentationLogic.cli import main as liverseg_main
from LiverSegmentationLogic.io.datasets import DatasetError, find_cases, k_folds, select_cases, split_cases
from LiverSegmentationLogic.errors import ModelNotFoundError
from LiverSegmentationLogic.training.finetuning import _promotion_decision, finetune
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.training.task_training import train_task
from LiverSegmentationLogic.models.model_files import load_model, save_model
from LiverSegmentationLogic.io.sample import sample_paths
from LiverSegmentationLogic.models.tasks import TaskError, list_tasks, load_task


def bundled_version(name="liver-mr-t2"):
    return next(e.version for e in catalog.list_models() if e.bundled and e.name == name)


def link_dataset(folder, source, patients):
    folder.mkdir(parents=True)
    for n in patients:
        for kind in ("image", "label"):
            os.symlink(source / f"{kind}_{n}.nii.gz", folder / f"{kind}_{n}.nii.gz")
    return folder


def small_task_file(folder, base="abdomen-mr-t2", name="tiny-abdomen", **changes):
    """A task added only as a file: a bundled task with a narrow network, under a new name."""
    spec = dict(load_task(base).spec, name=name, network={"width": 8, "depth": 3, "dropout": 0.0}, **changes)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    path = folder / "tasks" / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_datasets_layouts_and_splits(tmp_path, chaos_mr):
    flat = find_cases(link_dataset(tmp_path / "flat", chaos_mr, [21, 3, 10]))
    assert [c.case_id for c in flat] == ["flat/3", "flat/10", "flat/21"]  # natural order
    nn = tmp_path / "nn"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    os.symlink(chaos_mr / "image_1.nii.gz", nn / "imagesTr" / "p1_0000.nii.gz")
    os.symlink(chaos_mr / "label_1.nii.gz", nn / "labelsTr" / "p1.nii.gz")
    assert [c.case_id for c in find_cases(nn)] == ["nn/p1"]
    with pytest.raises(DatasetError, match="no image"):
        find_cases(nn, n_channels=2)
    with pytest.raises(DatasetError, match="not found"):
        find_cases(tmp_path / "missing")
    # names from another copy of the dataset still find their case
    assert [c.case_id for c in select_cases(flat, ["chaos-mr-t2/21"])] == ["flat/21"]
    train, held = split_cases(flat, ["21"])
    assert [c.case_id for c in held] == ["flat/21"] and len(train) == 2
    folds = k_folds(flat, 3)
    assert sorted(c.case_id for f in folds for c in f) == sorted(c.case_id for c in flat)
    with pytest.raises(DatasetError):
        split_cases(flat[:1])


def test_bundled_tasks_and_a_user_task_file(home):
    names = [t.name for t in list_tasks()]
    for name in ("liver-mr-t2", "abdomen-mr-t2", "liver-ct", "liver-lesion-ct", "liver-lesion-ct-3class",
                 "liver-dixon-mr"):
        assert name in names
    small_task_file(home)
    assert "tiny-abdomen" in [t.name for t in list_tasks()]
    assert load_task("abdomen-mr-t2").card()["quality"] == {"contrast_check": True}  # the QC's contrast check
    assert "quality" not in load_task("liver-ct").card()
    spec = dict(load_task("liver-ct").spec, name="broken")
    (home / "tasks" / "broken.json").write_text(json.dumps({"name": "broken", "classes": []}))
    with pytest.raises(TaskError, match="broken.json: missing field"):
        list_tasks()
    for quality in ({"contrast_check": "yes"}, {"contrast": True}, ["contrast_check"]):
        (home / "tasks" / "broken.json").write_text(json.dumps(dict(spec, quality=quality)))
        with pytest.raises(TaskError, match="broken.json: 'quality' must be"):
            list_tasks()


def test_tiny_training_reduces_loss_and_writes_a_loadable_model_with_a_card(home, tmp_path, chaos_mr, capsys):
    data = link_dataset(tmp_path / "mr", chaos_mr, [1, 21])
    task = load_task(small_task_file(home))
    model = train_task(task, [data], epochs=4, validation=["21"], checkpoint=tmp_path / "ckpt.pt")
    losses = model.card["training"]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    reloaded = load_model("tiny-abdomen")  # registered and, as the task's first model, activated
    assert reloaded.folder == model.folder
    card = reloaded.card
    assert card["validation"]["validation_cases"] == ["mr/21"]
    assert set(card["validation"]["mean_dice"]) == {"liver", "right kidney", "left kidney", "spleen"}
    assert card["training"]["train_cases"] == ["mr/1"]
    torch = pytest.importorskip("torch")  # device "auto": the GPU where there is one
    expected = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU threads"
    assert expected in card["training"]["hardware"]
    # the checkpoint resumes: asking for the same epochs again trains no further
    again = train_task(task, [data], output=tmp_path / "again", epochs=4, validation=["21"],
                       checkpoint=tmp_path / "ckpt.pt", log=lambda m: None)
    assert again.card["training"]["losses"] == losses


def test_bf16_training_follows_fp32_keeps_fp32_weights_and_resumes_only_in_bf16(home, tmp_path, chaos_mr):
    import torch

    data = link_dataset(tmp_path / "mr", chaos_mr, [1, 21])
    task = load_task(small_task_file(home))
    with pytest.raises(ValueError, match="precision 'fp16'"):  # before any case is read
        train_task(task, [data], epochs=1, precision="fp16", log=lambda m: None)
    runs = {precision: train_task(task, [data], output=tmp_path / precision, epochs=3, validation=["21"],
                                  checkpoint=tmp_path / f"{precision}.pt", precision=precision, log=lambda m: None)
            for precision in ("fp32", "bf16")}
    fp32, bf16 = (runs[p].card["training"]["losses"] for p in ("fp32", "bf16"))
    # the same seed and batches: bf16 rounds differently (so it ran) but learns the same way
    assert bf16 != fp32 and bf16[-1] < bf16[0]
    np.testing.assert_allclose(bf16, fp32, rtol=0.01)
    assert runs["bf16"].card["training"]["precision"].startswith("bf16 autocast")
    assert runs["fp32"].card["training"]["precision"] == "fp32"
    assert all(p.dtype == torch.float32 for p in runs["bf16"].network.parameters())
    with pytest.raises(ValueError, match="trained in bf16; resume it in that precision, not fp32"):
        train_task(task, [data], output=tmp_path / "mixed", epochs=4, validation=["21"],
                   checkpoint=tmp_path / "bf16.pt", log=lambda m: None)


def test_an_interrupted_training_resumes_to_the_weights_of_one_that_ran_through(home, tmp_path, chaos_mr):
    """A CPU training killed between epochs (a session ending) and run again ends with the same
    network: the checkpoint carries every random state, dropout's included, and the initial
    weights come from the seed."""
    import torch
    from LiverSegmentationLogic.training.task_training import load_task_cases, new_network, train_config
    from LiverSegmentationLogic.training.trainer import train_network

    path = small_task_file(home, name="tiny-dropout")
    spec = json.loads(path.read_text())
    path.write_text(json.dumps(dict(spec, network=dict(spec["network"], dropout=0.1))))
    task = load_task(path)
    cases = load_task_cases(task, find_cases(link_dataset(tmp_path / "mr", chaos_mr, [1])))
    train = train_config(task, cases, epochs=2, seed=3, device="cpu")

    class Killed(Exception):
        pass

    def killed_after_the_first_epoch(epoch, loss, network):
        raise Killed

    through = new_network(task, seed=3)
    losses = train_network(through, cases, task.preprocess_config(), train, checkpoint=tmp_path / "through.pt",
                           log=lambda m: None)
    with pytest.raises(Killed):
        train_network(new_network(task, seed=3), cases, task.preprocess_config(), train,
                      checkpoint=tmp_path / "killed.pt", on_epoch=killed_after_the_first_epoch, log=lambda m: None)
    torch.manual_seed(12345)  # a new process: torch's own generator starts elsewhere
    resumed = new_network(task, seed=3)
    log = []
    assert train_network(resumed, cases, task.preprocess_config(), train, checkpoint=tmp_path / "killed.pt",
                         log=log.append) == losses
    assert log[0].startswith("resumed from") and len(log) == 2
    after, before = resumed.state_dict(), through.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_random_patches_cover_the_slice_and_favour_the_foreground():
    from LiverSegmentationLogic.training.trainer import random_patch

    rng = np.random.default_rng(0)
    image = np.arange(2 * 40 * 50, dtype=np.float32).reshape(2, 40, 50)
    labels = np.zeros((40, 50), np.uint8)
    labels[30:34, 44:48] = 1  # a small organ in a corner
    hits = 0
    for _ in range(300):
        patch, patch_labels = random_patch(image, labels, 16, rng)
        assert patch.shape == (2, 16, 16) and patch_labels.shape == (16, 16)
        # a true window of the slice: image and labels cut at the same place
        y0, x0 = np.argwhere(image[0] == patch[0, 0, 0])[0]
        np.testing.assert_array_equal(labels[y0 : y0 + 16, x0 : x0 + 16], patch_labels)
        hits += patch_labels.any()
    # uniform windows hold the organ about 12 % of the time; a third are centred on it
    assert 0.3 < hits / 300 < 0.6
    small, small_labels = random_patch(image[:, :10, :12], labels[:10, :12], 16, rng)
    assert small.shape == (2, 16, 16) and small[:, :3].max() == 0  # padded, centred


def test_augmentation_moves_images_and_labels_together_and_its_options_add_nnunet_s():
    import torch

    from LiverSegmentationLogic.training.trainer import Augmentation, augment_batch

    images = torch.zeros(64, 2, 48, 48)
    images[:, :, 4:20, 6:18] = 1  # an organ in the upper left quadrant
    labels = (images[:, 0] > 0.5).long()

    def run(augmentation):
        x, y = augment_batch(images, labels, torch.Generator().manual_seed(0), augmentation=augmentation)
        organ = x[:, 1] > 0.5
        dice = 2 * (organ & (y > 0)).sum((1, 2)) / (organ.sum((1, 2)) + (y > 0).sum((1, 2)))
        assert dice.min() > 0.8  # the labels follow the image wherever it went
        found = (y > 0).nonzero()  # (sample, row, column) of every organ pixel
        centres = torch.stack([found[found[:, 0] == i, 1:].float().mean(0) for i in range(len(y))])
        return x, {tuple(q) for q in (centres > 24).tolist()}

    sharp, quadrants = run(Augmentation())
    assert quadrants == {(False, False)}
    _, quadrants = run(Augmentation(mirror=True))
    assert len(quadrants) == 4  # both axes mirrored, apart and together
    soft, _ = run(Augmentation(blur_probability=1.0, low_resolution_probability=1.0))
    edges = lambda x: (x[..., 1:] - x[..., :-1]).abs().amax((1, 2, 3))  # noqa: E731
    assert (edges(soft) < 0.8 * edges(sharp)).all()
    assert "mirroring" in Augmentation(mirror=True).describe()
    with pytest.raises(ValueError, match="unknown augmentation option"):
        Augmentation.from_options({"mirrors": True})


def test_histogram_shift_bends_the_contrast_between_tissues_but_keeps_their_order():
    """MONAI's RandHistogramShift as an option: one monotonic curve per image (all its neighbour
    slices), reproducible from the training seed, off by default."""
    import torch

    from LiverSegmentationLogic.training.trainer import Augmentation, _shift_histograms

    ramp = torch.linspace(0, 1, 48 * 48).reshape(1, 48, 48)
    images = ramp.repeat(32, 3, 1, 1)  # every intensity 0-1, the same in each neighbour slice
    chosen = torch.arange(32) % 2 == 0
    shifted = _shift_histograms(images, chosen, seed=7)
    assert torch.equal(shifted[~chosen], images[~chosen])
    flat = shifted[chosen].flatten(2)
    assert (flat[..., 1:] >= flat[..., :-1] - 1e-6).all()  # the order of intensities holds
    assert torch.equal(shifted[chosen][:, 0], shifted[chosen][:, 2])  # one curve for all of an image's slices
    assert (flat[..., 0] == 0).all() and torch.allclose(flat[..., -1], torch.ones(1))  # and the range
    # the mid-tones move, by different amounts in different images (0.4 and 0.8: liver and spleen)
    mid = shifted[chosen][:, 0].flatten(1)[:, [int(0.4 * 48 * 48), int(0.8 * 48 * 48)]]
    assert (mid - torch.tensor([0.4, 0.8])).abs().max() > 0.1 and mid[:, 0].std() > 0.02
    assert torch.equal(shifted, _shift_histograms(images, chosen, seed=7))
    assert not torch.equal(shifted, _shift_histograms(images, chosen, seed=8))
    assert "histogram shift" in Augmentation(histogram_shift_probability=0.3).describe()
    assert "histogram" not in Augmentation().describe()


def test_patch_training_runs_and_the_model_segments_whole_volumes(home, tmp_path, chaos_mr):
    data = link_dataset(tmp_path / "mr", chaos_mr, [1, 21])
    task = load_task(small_task_file(home, training={"patch_size": 64, "augmentation": {"mirror": True}}))
    model = train_task(task, [data], output=tmp_path / "patches", epochs=2, validation=["21"], log=lambda m: None)
    assert "of 64 x 64 patches" in model.card["training"]["optimiser"]
    assert "mirroring" in model.card["training"]["augmentation"]
    assert set(model.card["validation"]["mean_dice"]) == {"liver", "right kidney", "left kidney", "spleen"}


def test_train_with_folds_records_every_case_by_a_model_that_never_saw_it(home, tmp_path, chaos_mr):
    """``liverseg train --folds k``: the card holds each case's Dice from its fold model, volume
    errors and Bland-Altman per class, and the quality control's rates, as the CV script's do."""
    data = link_dataset(tmp_path / "mr", chaos_mr, [1, 21, 31])
    task = load_task(small_task_file(home))
    trained_on = []
    model = train_task(task, [data], output=tmp_path / "model", epochs=1, folds=3, checkpoint=tmp_path / "c.pt",
                       log=lambda line: trained_on.append(line) if line.startswith("fold") else None)
    record = model.card["validation"]
    cases = ["mr/1", "mr/21", "mr/31"]
    assert sorted(record["validation_cases"]) == cases and sorted(record["per_case_dice"]) == cases
    # one case per fold, in the order the folds trained
    assert [line.split(": validating on ")[1] for line in trained_on] == record["validation_cases"]
    assert "3-fold" in record["method"] and model.card["training"]["train_cases"] == cases  # shipped: all
    liver = record["per_class"]["liver"]
    assert len(liver["volume_error_percent"]) == 3 and "bias" in liver["bland_altman_percent"]
    assert liver["mean_dice"] == pytest.approx(np.mean([d["liver"] for d in record["per_case_dice"].values()]))
    assert record["quality"]["structures_below_0.85"] == sum(
        d < 0.85 for case in record["per_case_dice"].values() for d in case.values())
    # interrupted and run again: every fold and the final model resume from their checkpoints (all
    # finished here), so nothing trains again and the record is the same
    resumed = []
    again = train_task(task, [data], output=tmp_path / "again", epochs=1, folds=3, checkpoint=tmp_path / "c.pt",
                       log=resumed.append)
    assert sum(line.startswith("resumed from") for line in resumed) == 4
    assert not any(line.startswith("epoch") for line in resumed)
    assert again.card["validation"]["per_case_dice"] == record["per_case_dice"]


def test_registry_activation_is_used_by_segment(home, tmp_path):
    bundled = load_model("liver-mr-t2")
    version, folder = catalog.new_version_folder("liver-mr-t2", "1.0.0", "ft")
    save_model(folder, bundled.network, dict(bundled.card, version=version))
    image, _ = sample_paths()

    def segmented_version():
        out = tmp_path / "r.json"
        assert liverseg_main(["segment", str(image), "-o", str(tmp_path / "s.nii.gz"), "--json", str(out), "-q"]) == 0
        return json.loads(out.read_text())["model"]["version"]

    shipped = bundled_version()
    assert segmented_version() == shipped  # nothing activated: the bundled model
    assert liverseg_main(["models", "activate", f"liver-mr-t2@{version}"]) == 0
    assert segmented_version() == version
    assert catalog.find_model("liver-mr-t2").ref == f"liver-mr-t2@{version}"
    assert liverseg_main(["models", "activate", f"liver-mr-t2@{shipped}"]) == 0  # back to the bundled one
    assert segmented_version() == shipped
    with pytest.raises(ModelNotFoundError, match=f"versions: {shipped}"):
        catalog.find_model("liver-mr-t2@9.9")


def test_finetune_on_a_corrupted_label_is_refused_promotion(home, tmp_path, chaos_mr):
    """A correction that is wrong (the liver's bounding box minus the liver) teaches the model
    the wrong thing: the result must be kept but not activated, with the regression named."""
    image = read_volume(chaos_mr / "image_3.nii.gz")
    liver = np.rint(read_volume(chaos_mr / "label_3.nii.gz", validate=False).array) == 1
    box = ndimage.find_objects(liver.astype(np.uint8))[0]
    corrupted = np.zeros(liver.shape, np.uint8)
    corrupted[box] = ~liver[box]
    CaseQueue(tmp_path / "queue").add(image, corrupted, {"study": "corrupt"})
    replay = link_dataset(tmp_path / "chaos", chaos_mr, [21])  # holds one base validation patient
    result = finetune("liver-mr-t2", tmp_path / "queue", replay=replay, replay_cases=0, epochs=4,
                      learning_rate=1e-3, log=lambda m: None)
    assert not result.promoted
    assert "regresses on the base validation set" in result.reason
    assert result.report["base_validation_cases"] == ["chaos/21"]
    assert result.report["base_validation_after"]["liver"] < result.report["base_validation_before"]["liver"] - 0.02
    assert catalog.find_model("liver-mr-t2").bundled  # the active model did not change
    card = load_model(f"liver-mr-t2@{result.model.card['version']}").card  # kept in the registry
    assert card["promotion"]["promoted"] is False and card["finetuning"]["base"] == f"liver-mr-t2 {bundled_version()}"


def test_promotion_rules():
    ok = {"queue_before": {"liver": 0.5}, "queue_after": {"liver": 0.9},
          "base_validation_before": {"liver": 0.90}, "base_validation_after": {"liver": 0.89}}
    assert _promotion_decision(ok, 0.02)[0]
    assert not _promotion_decision(dict(ok, base_validation_after={"liver": 0.85}), 0.02)[0]
    assert not _promotion_decision(dict(ok, queue_after={"liver": 0.5}), 0.02)[0]
    no_guard = {k: v for k, v in ok.items() if not k.startswith("base")}
    promoted, reason = _promotion_decision(no_guard, 0.02)
    assert not promoted and "--replay" in reason


def test_regression_reference_is_the_first_model_of_the_line():
    from LiverSegmentationLogic.training.finetuning import validation_reference

    root = {"version": "1.0.0"}
    first = {"promotion": {"base_validation_cases": ["mr/21"], "base_validation_before": {"liver": 0.92}}}
    assert validation_reference(root, ["mr/21"]) is None  # the first of its line: measure the base model
    # the second fine-tune is held to the root's 0.92, not to the first fine-tune's own score
    assert validation_reference(first, ["mr/21"]) == {"liver": 0.92}
    assert validation_reference(first, ["mr/2"]) is None  # other cases: measure


def test_finetune_needs_queued_cases(home, tmp_path):
    from LiverSegmentationLogic.training.finetuning import FinetuneError

    with pytest.raises(FinetuneError, match="holds no cases"):
        finetune("liver-mr-t2", tmp_path / "empty-queue")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_training_on_a_missing_gpu_fails_at_once_with_a_clear_message(home, tmp_path, capsys):
    queue = tmp_path / "no-queue-needed"
    assert liverseg_main(["finetune", "--queue", str(queue), "--device", "cuda"]) == 2
    assert liverseg_main(["train", str(tmp_path), "--task", "liver-mr-t2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("CUDA was requested but no CUDA device is available") == 2
    assert "Traceback" not in err


def test_models_cli_lists_and_describes(home, capsys):
    assert liverseg_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"* liver-mr-t2@{bundled_version()}" in out and f"abdomen-mr-t2@{bundled_version('abdomen-mr-t2')}" in out
    assert liverseg_main(["models", "info", "abdomen-mr-t2"]) == 0
    assert json.loads(capsys.readouterr().out)["validation"]["mean_dice"]["spleen"] > 0.8
    assert liverseg_main(["models", "activate", "nope@1"]) == 2


def test_output_piped_into_a_reader_that_stops_is_not_an_error(home):
    """`liverseg models info ... | head -1`: the reader goes away before the output is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "LiverSegmentationLogic.cli", "models", "info", "liver-mr-t2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


def test_new_version_folders_count_up(home):
    v1, f1 = catalog.new_version_folder("x", "1.0.0", "ft")
    f1.mkdir(parents=True)
    v2, _ = catalog.new_version_folder("x", "1.0.0", "ft")
    assert (v1, v2) == ("1.0.0-ft1", "1.0.0-ft2")
    with pytest.raises(ValueError):
        catalog.new_version_folder("../evil", "1", "ft")
    shutil.rmtree(f1)


def test_an_interrupted_finetune_leaves_no_version_and_the_active_one(home, tmp_path, sample_case, monkeypatch):
    """The candidate is built in a hidden staging folder: a run that fails (or is killed) after
    writing it lists no new version and changes nothing active. A failed run removes its staging
    folder; one that a killed run left is removed by a later run once it is a day old."""
    from LiverSegmentationLogic.io.volumes import crop_volume
    from LiverSegmentationLogic.training import finetuning

    image, reference = sample_case
    box = (slice(14, 18), slice(None), slice(None))
    CaseQueue(tmp_path / "q").add(crop_volume(image, box), (reference[box] == 1).astype(np.uint8), {"study": "S"})
    before = {e.ref for e in catalog.list_models()}
    active = catalog.active_model("liver-mr-t2", "S").ref

    measure = finetuning.evaluate_cases

    def crash(model, *args, **kwargs):
        if not model.folder.name.endswith(".partial"):
            return measure(model, *args, **kwargs)  # the base model's scores, before training
        staged = list((home / "models" / "liver-mr-t2").glob(".*.partial"))
        assert staged and (staged[0] / catalog.CARD_NAME).exists()  # the candidate was written...
        raise RuntimeError("power cut")

    monkeypatch.setattr(finetuning, "train_network", lambda *args, **kwargs: [])  # no training needed here
    monkeypatch.setattr(finetuning, "evaluate_cases", crash)  # ...and the run dies while checking the candidate
    line = home / "models" / "liver-mr-t2"
    killed, running = line / ".2.0.0+S-ft1.999.partial", line / ".2.0.0+S-ft1.998.partial"
    for left in (killed, running):
        left.mkdir(parents=True)
        (left / catalog.CARD_NAME).write_text("{}")
    day = time.time() - finetuning.STALE_STAGING_S
    os.utime(killed, (day - 60, day - 60))
    with pytest.raises(RuntimeError, match="power cut"):
        finetune("liver-mr-t2", tmp_path / "q", study="S", device="cpu", log=lambda line: None)
    assert {e.ref for e in catalog.list_models()} == before
    assert catalog.active_model("liver-mr-t2", "S").ref == active
    assert list(line.glob(".*.partial")) == [running]  # its own and the day-old one are gone


def test_a_growing_queue_keeps_a_finetune_within_its_budget(home, tmp_path, sample_case, monkeypatch):
    """The gate measures the queued cases newest first while the time budget lasts (the newest
    always), and what was measured once (a model's Dice on a case, the hidden classes of a case) is not
    measured again by the next fine-tune of the line."""
    from LiverSegmentationLogic.io.volumes import crop_volume
    from LiverSegmentationLogic.training import finetuning

    image, reference = sample_case
    queue = CaseQueue(tmp_path / "q")
    for start in (12, 16, 20):
        box = (slice(start, start + 4), slice(None), slice(None))
        queue.add(crop_volume(image, box), (reference[box] == 1).astype(np.uint8), {"study": "S"})
    newest = queue.list()[-1]["case_id"]
    measure, measured = finetuning.evaluate_cases, []

    def counting(model, cases, reference):
        measured.append((model.folder.name.endswith(".partial"), [c.case_id for c in cases]))
        return measure(model, cases, reference)

    monkeypatch.setattr(finetuning, "evaluate_cases", counting)
    monkeypatch.setattr(finetuning, "train_network", lambda *args, **kwargs: [])  # the schedule is under test
    # a budget that is spent before the gate: it measures the newest case all the same, and no other.
    # The gate's deadline (the budget less the save reserve) is then the start itself, so nothing
    # else fits however fast the machine is (6 s left a fast one time for a second case)
    budget = finetuning.SAVE_RESERVE_S
    first = finetune("liver-mr-t2", queue.folder, study="S", time_budget_s=budget, device="cpu", log=lambda m: None)
    assert first.report["queued_cases"] == [f"queue/{m['case_id']}" for m in queue.list()]
    assert first.report["evaluated_cases"] == [f"queue/{newest}"]
    assert set(first.report["queue_after_per_case"]) == {f"queue/{newest}"}
    assert measured == [(False, [f"queue/{newest}"]), (True, [f"queue/{newest}"])]  # base before, candidate after
    assert first.report["time_s"]["budget"] == budget
    assert len(list((home / "cache" / "finetuning" / "hidden").rglob("*.npz"))) == 3

    measured.clear()
    second = finetune("liver-mr-t2", queue.folder, study="S", time_budget_s=budget, device="cpu", log=lambda m: None)
    assert measured == [(True, [f"queue/{newest}"])]  # the base model's score came from the cache
    assert second.report["queue_before_per_case"] == first.report["queue_before_per_case"]


def test_the_gate_takes_the_suggestion_s_dice_from_the_export(home, tmp_path, sample_case, monkeypatch):
    """A case exported from the panel records the model that made the suggestion and the Dice of
    that suggestion against the correction: the gate's 'before' score, without segmenting again."""
    from LiverSegmentationLogic.io.volumes import crop_volume
    from LiverSegmentationLogic.training import finetuning

    image, reference = sample_case
    box = (slice(14, 18), slice(None), slice(None))
    base = load_model("liver-mr-t2")
    export = {"study": "S", "suggestion_audit": {"model": {"sha256": base.card["sha256"]}},
              "suggestion_dice": {"liver": 0.5}}
    CaseQueue(tmp_path / "q").add(crop_volume(image, box), (reference[box] == 1).astype(np.uint8), export)
    measure, measured = finetuning.evaluate_cases, []

    def counting(model, cases, reference):
        measured.append(model.folder.name.endswith(".partial"))
        return measure(model, cases, reference)

    monkeypatch.setattr(finetuning, "evaluate_cases", counting)
    monkeypatch.setattr(finetuning, "train_network", lambda *args, **kwargs: [])
    result = finetune("liver-mr-t2", tmp_path / "q", study="S", device="cpu", log=lambda m: None)
    assert measured == [True]  # only the candidate was segmented
    assert list(result.report["queue_before_per_case"].values()) == [{"liver": 0.5}]
