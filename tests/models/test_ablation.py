"""The ablation table's reader: rows picked by defense and attack, training hours summed, table and plot written."""

import json

import pytest

from atop_models.evaluation.ablation import load_rows, main


def write(path, payload):
    path.write_text(json.dumps(payload))
    return path.name


def test_ablation_table_and_plot(tmp_path):
    run = tmp_path / "metrics.jsonl"
    run.write_text('{"epoch": 1, "train_seconds": 1800}\n{"epoch": 2, "train_seconds": 900}\n')
    clean = {"rows": [{"defense": "undefended", "n": 10, "clean_accuracy": 0.9, "ci95": [0.6, 0.98]}]}
    clean["rows"].append({"defense": "rt+atop", "n": 10000, "clean_accuracy": 0.7, "ci95": [0.69, 0.71]})
    pgd = {"defense": "rt+atop", "attack": "pgd-eot (20 steps, EOT 4)", "attack_name": "pgd-eot", "norm": "linf"}
    results = {"rows": [pgd | {"n": 256, "robust_accuracy": 0.4, "ci95": [0.34, 0.46]}]}
    results["rows"].insert(0, {**pgd, "attack_name": "fgsm", "n": 256, "robust_accuracy": 0.9, "ci95": [0.8, 1]})
    spec = {
        "rows": [
            {
                "label": "trained",
                "clean": write(tmp_path / "clean.json", clean),
                "results": write(tmp_path / "results.json", results),
                "defense": "rt+atop",
                "metrics": "metrics.jsonl",
                "base_cpu_hours": 1.5,
            },
            {"label": "given", "clean": "clean.json", "results": "results.json", "defense": "rt+atop", "cpu_hours": 2},
            {"label": "grid a", "clean": "clean.json", "results": "results.json", "defense": "rt+atop", "cpu_hours": 1},
            {"label": "gpu", "clean": "clean.json", "results": "results.json", "defense": "rt+atop", "cpu_hours": 0.1}
            | {"device": "H200"},
        ]
    }
    spec_path = tmp_path / "spec.json"
    write(spec_path, spec)
    main([str(spec_path)])
    assert not (tmp_path / "series.png").exists()  # no row has an x
    spec["series_axis"] = "noise sigma"
    for row, x in zip(spec["rows"][1:3], (0.1, 0.2), strict=True):
        row |= {"series": "RT grid", "point": f"sigma {x}", "x": x}
    write(spec_path, spec)
    trained, given, grid, _ = load_rows(spec_path)
    assert (trained["clean"], trained["robust"], trained["cpu_hours"]) == (0.7, 0.4, 2.25)  # pgd-eot, not fgsm
    assert given["cpu_hours"] == 2
    assert (trained["series"], given["series"], grid["point"]) == (None, "RT grid", "sigma 0.2")
    assert (trained["number"], given["number"], grid["number"]) == (1, 2, 2)  # a series' rows share its number
    main([str(spec_path)])
    table = (tmp_path / "ablation.md").read_text()
    assert "| 1 | trained | 70.0% (69.0-71.0, n=10000) | 40.0% (34.0-46.0, n=256) | 2.25 |" in table
    assert "| 3 | gpu | 70.0% (69.0-71.0, n=10000) | 40.0% (34.0-46.0, n=256) | 0.10 on one H200 |" in table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    assert (tmp_path / "series.png").stat().st_size > 10_000

    spec["rows"][0]["defense"] = "rt+pretrained"
    write(spec_path, spec)
    with pytest.raises(SystemExit, match=r"clean.json has no pgd-eot l_inf row for defense 'rt\+pretrained'"):
        load_rows(spec_path)
