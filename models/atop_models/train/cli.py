"""atop-train classifier | pretrain | finetune

Runs on CUDA when present, else the CPU; under `torchrun --nproc-per-node N` it trains with DDP (NCCL on
GPUs, gloo on CPUs). Each run folder gets config.json, metrics.jsonl, a resumable state.safetensors (and
progress.safetensors part-way through an epoch) and the model checkpoints; rerunning the same command resumes
where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atop_models.data import TooFewImages
from atop_models.defended import MismatchedCheckpoints
from atop_models.runtime import setup_runtime, teardown_runtime
from atop_models.train import classifier, pipeline, purifier
from atop_models.train.loop import TrainingHalted, fit
from atop_models.train.options import add_options, from_options
from atop_models.train.run_dir import RunDir

COMMANDS = {
    "classifier": (classifier.ClassifierConfig, classifier.build, "train the classifier"),
    "pretrain": (purifier.PretrainConfig, purifier.build_pretrain, "pretrain the purifier (L1 + GAN on RT'd inputs)"),
    "finetune": (
        purifier.FinetuneConfig,
        purifier.build_finetune,
        "AToP: fine-tune the purifier with an adversarial loss",
    ),
    "pipeline": (
        pipeline.PipelineTrainConfig,
        pipeline.build,
        "train the defended pipeline's classifier (optionally its purifier) on adversarial examples through it",
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="atop-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _, description) in COMMANDS.items():
        sub = commands.add_parser(name, help=description, description=description)
        sub.add_argument("--out", required=True, type=Path, help="run folder (created; an existing run resumes)")
        sub.add_argument("--restart", action="store_true", help="discard a previous run in --out instead of resuming")
        sub.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
        sub.add_argument(
            "--checkpoint-minutes",
            type=float,
            default=10.0,
            help="save the resumable state at least this often (and at every epoch's end)",
        )
        add_options(sub, config_cls)
    args = parser.parse_args(argv)
    config_cls, build, _ = COMMANDS[args.command]
    config = from_options(config_cls, args)

    runtime = setup_runtime(args.device)
    try:
        run = RunDir(args.out, runtime)
        resume = run.start(args.command, config, args.restart)
        try:
            task, loader = build(config, runtime, args.out)
        except TooFewImages as error:
            parser.exit(
                2,
                f"atop-train {args.command}: error: {error}: lower --batch-size or train on more images "
                "(--data-train-images; 0 = all)\n",
            )
        except MismatchedCheckpoints as error:
            raise SystemExit(str(error)) from error
        try:
            history = fit(task, loader, run, runtime, config.epochs, config.seed, args.checkpoint_minutes, resume)
        except TrainingHalted as halt:
            raise SystemExit(
                f"atop-train {args.command}: stopped at {halt} (metrics in {run.metrics_path}); rerun with another "
                "--seed or a stronger training attack (more --adv-steps, its --adv-step-size) to go on from the end "
                f"of epoch {halt.kept_epochs}, the last one kept, or with --restart and another --seed or --adv-kind "
                'pgd --adv-steps 2 (docs/design.md, "Training that diverges")'
            ) from halt
        if runtime.is_main and history:
            print(json.dumps(history[-1]))
    finally:
        teardown_runtime(runtime)


if __name__ == "__main__":
    main()
