"""Clean accuracy of each defense on a whole test split, with a 95% interval: the model card's figures.

  python -m atop_models.evaluation.clean --classifier C --pretrained P --atop A \\
      --defenses undefended rt rt+pretrained rt+atop rt+atop@4 --out runs/clean.json

The randomized defenses are drawn with --seed, so a rerun repeats its figures exactly, and every row records
which images it got right (`correct_mask`): `python -m atop_models.evaluation.compare A.json B.json` pairs two
such files (e.g. two checkpoints under the same seed) image by image.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from atop_models.checkpoint import read_config
from atop_models.data import DEFAULT_SOURCE, SOURCE_HELP, load_split
from atop_models.evaluation import defenses
from atop_models.evaluation.statistics import encode_mask, predictions, wilson95
from atop_models.runtime import setup_runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atop_models.evaluation.clean",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--classifier", required=True, help="classifier checkpoint")
    parser.add_argument("--pretrained", default="", help="purifier checkpoint before AToP fine-tuning")
    parser.add_argument("--atop", default="", help="AToP fine-tuned purifier checkpoint")
    parser.add_argument("--defenses", nargs="+", default=["undefended"], help="as atop-eval's, e.g. rt+atop@4")
    parser.add_argument("--images", type=int, default=0, help="0: the whole test split; N: a class-balanced subset")
    parser.add_argument("--out", type=Path, help="JSON file for the rows (also printed)")
    parser.add_argument("--data-source", default=DEFAULT_SOURCE, help=SOURCE_HELP + " (default: %(default)s)")
    parser.add_argument("--data-cache-dir", default=".data")
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="also draw every image a second time: the share whose top-1 is the same (the answer's stability)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = setup_runtime(args.device).device
    size = read_config(args.classifier)["image_size"]
    data = load_split(args.data_source, "test", size, args.data_cache_dir, count=args.images)
    checkpoints = defenses.Checkpoints(args.classifier, args.pretrained, args.atop)
    rows = []
    for name in args.defenses:
        model, _ = defenses.build(name, checkpoints, device)
        torch.manual_seed(args.seed)
        started = time.monotonic()
        first = predictions(model, data, device, size)
        hits = (first == data.labels).tolist()
        correct = sum(hits)
        row = {"defense": name, "n": len(data), "clean_accuracy": correct / len(data)}
        row["ci95"] = wilson95(correct, len(data))
        # Per image, in the data's order: what `compare` pairs two defenses (or two checkpoints) on.
        row["correct_mask"] = encode_mask(hits)
        if args.agreement:
            row["top1_agreement"] = float((predictions(model, data, device, size) == first).float().mean())
        rows.append(row | {"seconds": round(time.monotonic() - started, 1)})
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "correct_mask"}))
    if args.out:
        command = "python -m atop_models.evaluation.clean " + shlex.join(sys.argv[1:] if argv is None else argv)
        payload = {"command": command, "data": args.data_source, "checkpoints": defenses.provenance(checkpoints)}
        args.out.write_text(json.dumps(payload | {"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
