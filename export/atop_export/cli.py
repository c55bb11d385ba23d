"""atop-export: trained checkpoints -> a checked ONNX model repository (Triton layout).

  atop-export --classifier runs/classifier/classifier --purifier runs/atop/purifier --repository model_repository

Writes <repository>/<name>[_uint8][_fp16]/{config.pbtxt, labels.txt, export_report.json, <version>/model.onnx}
and a README.md saying where the repository came from; exits non-zero with the failed check's message when
a check fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from atop_export.checks import ExportCheckError
from atop_export.exporter import ExportConfig, export_repository
from atop_export.onnx_build import OPTIMIZATION_LEVELS
from atop_models.checkpoint import paths, read_config
from atop_models.defended import MismatchedCheckpoints


def write_readme(repository: Path, reports: dict[str, dict], classifier: str, purifier: str, command: str) -> None:
    rows = []
    for name, report in sorted(reports.items()):
        parity = report["checks"]["parity"][0]
        agree = f"{parity['top1_agreement']:.3f}" if "top1_agreement" in parity else "-"
        rows.append(
            f"| `{name}` | {report['role']} | {report['input']} | {report['precision']} | "
            f"{parity['max_abs_diff']:.2e} | {agree} |"
        )
    sources = "\n".join(
        f"- {part}: `{path}` (sha256 {read_config(path)['weights_sha256']})"
        for part, path in (("classifier", classifier), ("purifier", purifier))
    )
    (repository / "README.md").write_text(
        "# Model repository (written by atop-export)\n\n"
        "Triton layout: `<model>/config.pbtxt`, `<model>/labels.txt`, `<model>/<version>/model.onnx`; each\n"
        "model's `export_report.json` holds every check's figures, and its ONNX metadata (`atop.*` keys) the\n"
        "labels, input layout and range, RT parameters, checkpoint hashes and training recipes.\n\n"
        f"## Source checkpoints\n{sources}\n\n## Rebuild\n```bash\n{command}\n```\n\n"
        "## Models and their parity with PyTorch (CPU)\n"
        "| model | role | input | precision | max abs diff | top-1 agreement |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="atop-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = ExportConfig()
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (stem, .safetensors or .json)")
    parser.add_argument("--purifier", required=True, help="purifier checkpoint: it names the RT and pipeline settings")
    parser.add_argument("--repository", required=True, type=Path, help="model repository folder to write into")
    parser.add_argument("--name", default=defaults.name, help="name of the defended model")
    parser.add_argument("--version", type=int, default=defaults.version)
    parser.add_argument(
        "--inputs",
        nargs="+",
        choices=["float", "uint8"],
        default=list(defaults.inputs),
        help="float: [N,3,H,W] in [0,1] (named NAME); uint8: decoded [N,H,W,3] (NAME_uint8)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "fp16"],
        default=list(defaults.precisions),
        help="fp16 adds NAME[_uint8]_fp16 for GPUs",
    )
    parser.add_argument(
        "--pieces",
        nargs="*",
        choices=["classifier", "purifier"],
        default=[],
        help="also export NAME_classifier (the undefended baseline) and NAME_purifier",
    )
    parser.add_argument("--opset", type=int, default=defaults.opset, help="ONNX opset (>= 18 for Col2Im)")
    parser.add_argument("--optimization-level", choices=OPTIMIZATION_LEVELS, default=defaults.optimization_level)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU in config.pbtxt")
    parser.add_argument("--parity-images", type=int, default=defaults.parity_images)
    args = parser.parse_args(argv)
    for checkpoint in (args.classifier, args.purifier):
        if not paths(checkpoint)[0].exists():
            parser.error(f"checkpoint {checkpoint} not found")
    config = ExportConfig(
        name=args.name,
        version=args.version,
        inputs=tuple(args.inputs),
        precisions=tuple(args.precisions),
        pieces=tuple(args.pieces),
        opset=args.opset,
        max_batch_size=args.max_batch_size,
        optimization_level=args.optimization_level,
        gpu=args.gpu,
        parity_images=args.parity_images,
    )
    command = shlex.join(["atop-export", *(sys.argv[1:] if argv is None else argv)])
    try:
        reports = export_repository(args.classifier, args.purifier, args.repository, config, command)
    except ExportCheckError as error:
        sys.exit(f"atop-export: check failed: {error}")
    except MismatchedCheckpoints as error:
        sys.exit(f"atop-export: {error}")
    write_readme(args.repository, reports, args.classifier, args.purifier, command)
    for name, report in reports.items():
        print(json.dumps({"model": name, **{k: v for k, v in report["checks"].items() if k != "unpredictability"}}))


if __name__ == "__main__":
    main()
