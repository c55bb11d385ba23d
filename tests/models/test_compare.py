"""The paired per-image comparison of two results files: worst case per side, counts, exact p, and a larger run
cut to the images of a smaller one."""

import json

import pytest

from atop_models.data import load_split
from atop_models.evaluation.compare import main


def results(path, *rows, data=None):
    payload = {"rows": [{"norm": "linf", "adaptive": True, **row} for row in rows]}
    if data is not None:
        payload["data"] = data
    path.write_text(json.dumps(payload))
    return str(path)


def first_of_class_mask(folder, cache) -> str:
    """A 20-image run's mask in which exactly the 10-image run's images (the first of each class) survive."""
    labels = load_split(folder, "test", 32, cache, count=20).labels.tolist()
    first_of_class = [i for i, label in enumerate(labels) if label not in labels[:i]]
    assert len(first_of_class) == 10
    return "".join("1" if i in first_of_class else "0" for i in range(20))


def compare(capsys, *argv):
    main([*argv])
    return json.loads(capsys.readouterr().out)


def test_worst_case_per_side_and_the_exact_p(tmp_path, capsys):
    a = results(
        tmp_path / "a.json",
        {"defense": "rt+atop", "attack_name": "pgd-eot", "robust_mask": "11110000"},
        {"defense": "rt+atop", "attack_name": "autoattack-rand", "robust_mask": "11011000"},
        {"defense": "undefended", "attack_name": "pgd-eot", "robust_mask": "00000000"},
    )
    b = results(tmp_path / "b.json", {"defense": "rt+atop", "attack_name": "pgd-eot", "robust_mask": "00000001"})
    worst = compare(capsys, a, b)  # a: images 0, 1, 3 survive both attacks
    assert worst == {"images": 8, "robust_a": 3, "robust_b": 1, "only_a": 3, "only_b": 1, "p_one_sided": 5 / 16}
    assert compare(capsys, a, b, "--attack-a", "pgd-eot")["only_a"] == 4
    with pytest.raises(SystemExit, match="no adaptive l_inf fgsm row"):
        main([a, b, "--attack-a", "fgsm"])


def test_a_larger_run_is_cut_to_the_smaller_runs_images(tmp_path, capsys, cifar_test_folder):
    big = first_of_class_mask(cifar_test_folder, tmp_path / "cache")
    a = results(tmp_path / "a.json", {"defense": "rt+atop", "attack_name": "pgd-eot", "robust_mask": big})
    b = results(tmp_path / "b.json", {"defense": "rt+atop", "attack_name": "pgd-eot", "robust_mask": "1" * 9 + "0"})
    cut = compare(capsys, a, b, "--data-source", str(cifar_test_folder), "--data-cache-dir", str(tmp_path / "cache"))
    assert cut == {"images": 10, "robust_a": 10, "robust_b": 9, "only_a": 1, "only_b": 0, "p_one_sided": 0.5}


def test_without_data_source_the_cut_uses_the_data_set_both_runs_record(tmp_path, capsys, cifar_test_folder):
    big = first_of_class_mask(cifar_test_folder, tmp_path / "cache")
    row, data = {"defense": "rt+atop", "attack_name": "pgd-eot"}, str(cifar_test_folder)
    a = results(tmp_path / "a.json", {**row, "robust_mask": big}, data=data)
    b = results(tmp_path / "b.json", {**row, "robust_mask": "0" * 10}, data=data)
    cut = compare(capsys, a, b, "--data-cache-dir", str(tmp_path / "cache"))
    assert cut["images"] == 10 and cut["robust_a"] == 10 and cut["only_a"] == 10


def test_a_cut_without_a_known_common_data_set_is_refused(tmp_path, cifar_test_folder):
    row = {"defense": "rt+atop", "attack_name": "pgd-eot"}
    big = results(tmp_path / "big.json", {**row, "robust_mask": "1" * 20}, data=str(cifar_test_folder))
    other = results(tmp_path / "other.json", {**row, "robust_mask": "1" * 10}, data="cifar100")
    with pytest.raises(SystemExit, match="record different data sets"):
        main([big, other])
    unrecorded = results(tmp_path / "unrecorded.json", {**row, "robust_mask": "1" * 10})
    with pytest.raises(SystemExit, match="does not record its data set"):
        main([big, unrecorded])
    gone = str(tmp_path / "elsewhere" / "cifar10-jpg.tar.gz")
    far = results(tmp_path / "far.json", {**row, "robust_mask": "1" * 20}, data=gone)
    near = results(tmp_path / "near.json", {**row, "robust_mask": "1" * 10}, data=gone)
    with pytest.raises(SystemExit, match="not on this machine"):
        main([far, near])


def clean_file(path, mask, defense="rt+atop"):
    row = {"defense": defense, "n": len(mask), "clean_accuracy": mask.count("1") / len(mask), "correct_mask": mask}
    path.write_text(json.dumps({"rows": [row]}))
    return str(path)


def test_two_clean_files_are_paired_image_by_image(tmp_path, capsys):
    a, b = clean_file(tmp_path / "a.json", "11110110"), clean_file(tmp_path / "b.json", "01110001")
    assert compare(capsys, a, b) == {
        "images": 8,
        "correct_a": 6,
        "correct_b": 4,
        "only_a": 3,
        "only_b": 1,
        "p_one_sided": 5 / 16,
    }
    attacked = results(tmp_path / "r.json", {"defense": "rt+atop", "attack_name": "pgd-eot", "robust_mask": "1" * 8})
    with pytest.raises(SystemExit, match="not the same kind"):
        main([a, attacked])
    with pytest.raises(SystemExit, match="clean-accuracy file: it has no attacks"):
        main([a, b, "--attack-a", "pgd-eot"])
    with pytest.raises(SystemExit, match="no row with per-image results for 'undefended'"):
        main([a, b, "--defense-b", "undefended"])
