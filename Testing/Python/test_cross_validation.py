"""scripts/cross_validate.py end to end on three real CHAOS MR patients (tiny training budget):
folds that never see their patients, a resumable training step, the evaluation's records and the
shipped ensemble's card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.inference.segmenter import Segmenter

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cross_validate.py"
PATIENTS = ("2", "21", "31")


def run(*args):
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def cross_validated(chaos_mr, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    data = root / "chaos-mr-t2"
    data.mkdir()
    for n in PATIENTS:
        for kind in ("image", "label"):
            (data / f"{kind}_{n}.nii.gz").symlink_to(chaos_mr / f"{kind}_{n}.nii.gz")
    work = root / "work"
    run("prepare", "--task", "abdomen-mr-t2", "--data", data, "--folds", 3, "--work", work)
    out = run("train", "--work", work, "--members", 1, "--epochs", 1, "--time-budget", 2, "--device", "cpu",
              "--jobs", 2, "--precision", "bf16", "--fold-seed", 1)
    return root, work, out


def test_each_fold_model_never_saw_its_patients(cross_validated):
    _, work, out = cross_validated
    plan = json.loads((work / "plan.json").read_text())
    assert sorted(c for fold in plan["folds"] for c in fold) == sorted(f"chaos-mr-t2/{n}" for n in PATIENTS)
    for f, held in enumerate(plan["folds"]):
        training = load_model(work / f"fold{f}").card["training"]
        trained_on = training["train_cases"]
        assert not set(trained_on) & set(held) and len(trained_on) == len(PATIENTS) - len(held)
        assert training["seed"] == 1  # --fold-seed; members keep theirs
    member = load_model(work / "member0").card["training"]
    assert member["seed"] == 0
    assert sorted(member["train_cases"]) == sorted(f"chaos-mr-t2/{n}" for n in PATIENTS)
    assert out.count("done") == 4  # 3 folds and 1 member
    again = run("train", "--work", work, "--members", 1, "--epochs", 1, "--device", "cpu")
    assert "training" not in again  # finished models are not trained again


def test_a_fold_trained_again_in_a_new_process_has_the_same_weights(cross_validated, tmp_path):
    """The card's command reproduces the model itself, not only its recipe: the initial weights,
    the sampling, the augmentation and the dropout all come from the training seed (torch seeds
    each new process at random)."""
    import torch

    _, work, _ = cross_validated
    weights = []
    for name in ("a", "b"):
        again = tmp_path / name
        again.mkdir()
        (again / "plan.json").write_text((work / "plan.json").read_text())
        (again / "cases.npz").symlink_to(work / "cases.npz")
        run("train", "--work", again, "--folds-to-train", 0, "--epochs", 1, "--device", "cpu", "--fold-seed", 1)
        weights.append(load_model(again / "fold0").network.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_evaluation_and_the_shipped_card(cross_validated):
    root, work, _ = cross_validated
    (work / "fold1").rename(work / "fold1-away")  # still training: an interim estimate, never shipped
    out = run("evaluate", "--work", work)
    (work / "fold1-away").rename(work / "fold1")
    interim = json.loads((work / "cv_results.json").read_text())
    assert "INTERIM" in out and interim["summary"]["folds_missing"] == [1]
    assert {r["fold"] for r in interim["cases"]} == {0, 2} and interim["summary"]["epochs_run"] == {"0": 1, "2": 1}
    refused = subprocess.run([sys.executable, str(SCRIPT), "ship", "--work", str(work), "--version", "9.9.9",
                              "--models", str(root / "models")], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "interim" in refused.stderr and not (root / "models").exists()

    out = run("evaluate", "--work", work)  # fold 1 is back: only its patient is segmented
    results = json.loads((work / "cv_results.json").read_text())
    plan = json.loads((work / "plan.json").read_text())
    assert out.count("rows reused") == 2 and plan["folds"][1][0] in out
    assert [r for r in results["cases"] if r["fold"] != 1] == interim["cases"]
    card = json.loads((work / "fold0" / "model_card.json").read_text())
    (work / "fold0" / "model_card.json").write_text(json.dumps(dict(card, created="2000-01-01")))  # another model
    out = run("evaluate", "--work", work)
    assert out.count("rows reused") == 2 and "fold 0: model unchanged" not in out
    assert "rows reused" not in run("evaluate", "--work", work, "--again")
    results = json.loads((work / "cv_results.json").read_text())
    assert {r["case"]: r["fold"] for r in results["cases"]} == {c: f for f, fold in enumerate(plan["folds"])
                                                                for c in fold}
    liver = results["summary"]["per_class"]["liver"]
    errors = [100 * (r["volume_ml"]["liver"] - r["reference_ml"]["liver"]) / r["reference_ml"]["liver"]
              for r in results["cases"]]
    assert liver["volume_error_percent"] == [round(e, 2) for e in errors]
    assert liver["bland_altman_percent"]["bias"] == pytest.approx(np.mean(errors), abs=0.01)
    assert liver["mean_dice"] == pytest.approx(np.mean([r["dice"]["liver"] for r in results["cases"]]))
    # the task asks for the contrast check: every structure found carries its agreement
    found = [(r, n) for r in results["cases"] for n, m in r["quality"]["structures"].items() if m["components"]]
    assert found and all(0 <= r["quality"]["structures"][n]["contrast_agreement"] <= 1 for r, n in found)
    quality = results["summary"]["quality"]
    assert quality["structures_below_0.85"] == sum(d < 0.85 for r in results["cases"] for d in r["dice"].values())

    run("ship", "--work", work, "--version", "9.9.9", "--models", root / "models", "--views", "liver-mr-t2")
    shipped = load_model(root / "models" / "abdomen-mr-t2")
    view = load_model(root / "models" / "liver-mr-t2")
    assert shipped.card["version"] == view.card["version"] == "9.9.9"
    assert set(view.card["validation"]["mean_dice"]) == {"liver"}
    assert view.card["validation"]["per_case_dice"].keys() == {r["case"] for r in results["cases"]}
    assert [c["name"] for c in view.classes] == ["liver"]
    assert shipped.card["quality"] == {"contrast_check": True} and "quality" not in view.card  # as their tasks say
    # what fine-tuning with replay needs: the label map, and the few patients its gate checks
    assert shipped.card["training"]["label_map"] == {"1": 1, "2": 2, "3": 3, "4": 4}
    assert sorted(view.card["validation"]["regression_cases"]) == sorted(f"chaos-mr-t2/{n}" for n in PATIENTS)
    training = shipped.card["training"]
    assert training["data"] == ["CHAOS MR T2-SPIR (Kavur et al., Medical Image Analysis 69, 2021; CC BY-SA 4.0)"]
    assert training["reproduce"][0].startswith("python scripts/cross_validate.py prepare --task abdomen-mr-t2 --data ")
    assert training["reproduce"][1].endswith("--members 1 --epochs 1 --precision bf16 --fold-seed 1")  # as trained
    assert "--views liver-mr-t2" in training["reproduce"][-1]
    assert training["members"][0]["precision"].startswith("bf16 autocast")
    assert training["loss"] == load_model(work / "member0").card["training"]["loss"]  # as trained, weights included
    image = read_volume(root / "chaos-mr-t2" / "image_21.nii.gz")
    labels = Segmenter(view, device="cpu").segment(image).labels
    assert labels.shape == image.array.shape and set(np.unique(labels)) <= {0, 1}


def test_two_recipes_are_combined_into_one_ensemble(cross_validated, tmp_path):
    """combine: each fold's models averaged (none of them saw the fold's patients), every member
    shipped, and the card says how to train each recipe and combine them; other folds are refused."""
    _, work, _ = cross_validated
    both = tmp_path / "both"
    run("combine", "--works", work, work, "--work", both)  # the same recipe twice: the average is that recipe
    plan = json.loads((work / "plan.json").read_text())
    for f, held in enumerate(plan["folds"]):
        fold = load_model(both / f"fold{f}")
        assert fold.network.config["members"] == 2 and fold.card["training"]["epochs_run"] == [1, 1]
        assert not set(fold.card["training"]["train_cases"]) & set(held)
    run("evaluate", "--work", work)
    run("evaluate", "--work", both)
    alone, averaged = ({r["case"]: r["dice"] for r in json.loads((w / "cv_results.json").read_text())["cases"]}
                       for w in (work, both))
    assert averaged.keys() == alone.keys()
    for case, dice in alone.items():
        assert averaged[case] == pytest.approx(dice, abs=1e-6)

    run("ship", "--work", both, "--version", "9.9.9", "--models", tmp_path / "models")
    training = load_model(tmp_path / "models" / "abdomen-mr-t2").card["training"]
    assert len(training["members"]) == 2 and "(seed 0, 1 epochs; seed 0, 1 epochs)" in training["ensemble"]
    assert [line.split()[2] for line in training["reproduce"]] == [
        "prepare", "prepare", "train", "train", "combine", "evaluate", "ship"]
    assert training["reproduce"][2].endswith("--work WORK_1 --members 1 --epochs 1 --precision bf16 --fold-seed 1")
    assert training["reproduce"][4].endswith("combine --works WORK_1 WORK_2 --work WORK")
    retrain = subprocess.run([sys.executable, str(SCRIPT), "train", "--work", str(both), "--epochs", "1"],
                             capture_output=True, text=True, timeout=300)
    assert retrain.returncode != 0 and "was combined from" in retrain.stderr  # train the sources instead

    other = tmp_path / "other"
    other.mkdir()
    (other / "plan.json").write_text(json.dumps(dict(plan, folds=plan["folds"][::-1])))
    refused = subprocess.run([sys.executable, str(SCRIPT), "combine", "--works", str(work), str(other), "--work",
                              str(tmp_path / "refused")], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "another task, data or folds" in refused.stderr


def test_training_step_runs_without_simpleitk(cross_validated, tmp_path):
    # the GPU machine that trains has neither the data nor SimpleITK: the prepared cases suffice
    _, work, _ = cross_validated
    for name in ("cases.npz", "plan.json"):
        (tmp_path / name).symlink_to(work / name)
    code = ("import runpy, sys; sys.modules['SimpleITK'] = None; "
            f"sys.argv = ['cross_validate.py', 'train', '--work', {str(tmp_path)!r}, '--one', 'fold0', "
            "'--epochs', '1', '--time-budget', '2', '--device', 'cpu']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert load_model(tmp_path / "fold0").card["training"]["epochs_run"] == 1


def test_prepare_converts_the_chaos_ct_dicom_case(lits_ct, chaos_ct, tmp_path):
    data = tmp_path / "lits-ct"
    data.mkdir()
    for kind in ("image", "label"):
        (data / f"{kind}_1.nii.gz").symlink_to(lits_ct / f"{kind}_1.nii.gz")  # the smallest (27 slices)
    work = tmp_path / "work"
    run("prepare", "--task", "liver-ct", "--data", data, chaos_ct, "--folds", 2, "--work", work)
    plan = json.loads((work / "plan.json").read_text())
    assert sorted(c for fold in plan["folds"] for c in fold) == ["chaos-ct/1", "lits-ct/1"]
    assert plan["data"] == [str(data.resolve()), str((work / "chaos-ct").resolve())]
    with np.load(work / "cases.npz") as cases:
        assert {"chaos-ct/1/labels", "lits-ct/1/labels"} <= set(cases.files)
        assert cases["chaos-ct/1/labels"].any()  # the liver PNGs landed on the DICOM slices


def test_device_script_brings_every_model_back_in_eight_files(cross_validated, tmp_path):
    """scripts/cv_on_device.sh: what a GPU call returns (at most 8 files) and what unpack takes."""
    import os

    _, work, _ = cross_validated
    device_script = SCRIPT.with_name("cv_on_device.sh")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["bash", str(device_script), "collect", str(work), str(out)], check=True)
    names = sorted(p.parent.name for p in work.glob("*/model_card.json"))
    assert len(names) >= 4
    assert sorted(p.name for p in out.iterdir()) == sorted([*(n + ".pt" for n in names), "cards.json"])

    def unpack(epochs):
        env = dict(os.environ, EPOCHS=str(epochs))
        return subprocess.run(["bash", str(device_script), "unpack", str(tmp_path / "back"), str(out)],
                              check=True, capture_output=True, text=True, env=env).stdout

    assert unpack(2).count("not taken") == len(names)  # cut short: nothing taken
    assert not (tmp_path / "back").exists()
    assert unpack(1).count("taken") == len(names)
    for name in names:
        back = load_model(tmp_path / "back" / name)  # the card's checksum matches the weights
        assert back.card == load_model(work / name).card


def test_a_cascade_is_cross_validated_and_shipped_with_its_first_stage(lits_ct, tmp_path):
    """liver-lesion-ct: every fold model, and the shipped one, segments behind a copy of the
    liver-ct model; the records score the liver as well as the lesions."""
    import shutil

    data = tmp_path / "lits-ct"
    data.mkdir()
    for n in ("0", "1"):  # the two smallest (28 and 27 slices)
        for kind in ("image", "label"):
            (data / f"{kind}_{n}.nii.gz").symlink_to(lits_ct / f"{kind}_{n}.nii.gz")
    work = tmp_path / "work"
    run("prepare", "--task", "liver-lesion-ct", "--data", data, "--folds", 2, "--work", work)
    run("train", "--work", work, "--members", 1, "--epochs", 1, "--time-budget", 2, "--device", "cpu")
    first_stage = load_model(work / "fold0" / "roi").card
    assert first_stage["name"] == "liver-ct" and first_stage["version"] == load_model(
        Path(__file__).resolve().parents[2] / "Resources" / "Models" / "liver-ct").card["version"]
    shutil.rmtree(work / "fold1" / "roi")  # as a GPU call brings it back: weights and card only
    run("evaluate", "--work", work)
    assert (work / "fold1" / "roi" / "model_card.json").is_file()
    results = json.loads((work / "cv_results.json").read_text())
    assert "liver-ct" in results["summary"]["first_stage"] and "trained on these patients too" in \
        results["summary"]["first_stage"]
    assert all(set(r["dice"]) == {"liver", "lesion"} for r in results["cases"])
    for r in results["cases"]:  # the first stage is the trained liver model: liver + lesions about right
        found, true = (sum(r[key].values()) for key in ("volume_ml", "reference_ml"))
        assert found == pytest.approx(true, rel=0.2)

    run("ship", "--work", work, "--version", "9.9.9", "--models", tmp_path / "models")
    shipped = load_model(tmp_path / "models" / "liver-lesion-ct")
    assert [c["name"] for c in shipped.classes] == ["liver", "lesion"]
    assert shipped.card["cascade"]["roi_version"] == f"liver-ct {first_stage['version']}"
    assert set(shipped.card["validation"]["mean_dice"]) == {"liver", "lesion"}
    image = read_volume(data / "image_1.nii.gz")
    labels = Segmenter(shipped, device="cpu").segment(image).labels
    assert labels.shape == image.array.shape and labels.any() and set(np.unique(labels)) <= {0, 1, 2}


def test_a_cascade_can_be_evaluated_behind_first_stage_fold_models(lits_ct, cross_validated, tmp_path):
    """``evaluate --first-stage``: each patient's liver comes from the liver-ct fold model that never
    saw it either; a first-stage cross-validation over other folds is refused."""
    data = tmp_path / "lits-ct"
    data.mkdir()
    for n in ("0", "1"):
        for kind in ("image", "label"):
            (data / f"{kind}_{n}.nii.gz").symlink_to(lits_ct / f"{kind}_{n}.nii.gz")
    liver, lesion = tmp_path / "liver", tmp_path / "lesion"
    for task, work in (("liver-ct", liver), ("liver-lesion-ct", lesion)):
        run("prepare", "--task", task, "--data", data, "--folds", 2, "--work", work)
        run("train", "--work", work, "--folds-to-train", 0, 1, "--epochs", 1, "--time-budget", 1, "--device", "cpu")
    run("evaluate", "--work", lesion, "--first-stage", liver)
    results = json.loads((lesion / "cv_results.json").read_text())
    assert "never saw the patient either" in results["summary"]["first_stage"]
    assert "rows reused" not in run("evaluate", "--work", lesion)  # behind another first stage: segmented again
    assert run("evaluate", "--work", lesion, "--first-stage", liver).count("rows reused") == 0  # and back
    run("train", "--work", lesion, "--folds-to-train", "members", "--members", 1, "--epochs", 1, "--time-budget", 1,
        "--device", "cpu")
    run("ship", "--work", lesion, "--version", "9.9.9", "--models", tmp_path / "models")
    reproduce = load_model(tmp_path / "models" / "liver-lesion-ct").card["training"]["reproduce"]
    assert reproduce[2].endswith("evaluate --work WORK --first-stage LIVER_CT_WORK")
    for f, held in enumerate(json.loads((lesion / "plan.json").read_text())["folds"]):
        first = load_model(lesion / f"fold{f}" / "roi").card
        assert first == load_model(liver / f"fold{f}").card and not set(first["training"]["train_cases"]) & set(held)
    _, other, _ = cross_validated  # three MR patients in three folds
    refused = subprocess.run([sys.executable, str(SCRIPT), "evaluate", "--work", str(lesion), "--first-stage",
                              str(other)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "other folds" in refused.stderr
