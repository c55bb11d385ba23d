"""`make mutation-check`: break the product on purpose, one breakage at a time, and run the test that must
notice. Each breakage below is applied to a temporary copy of the working tree (never to the checkout), the
copy's packages are put first on the import path (the servers the tests start as processes inherit it), and
its test runs there. The tests are first run unbroken: a test that fails anyway proves nothing.

Exit 0 when every breakage is caught; 1 when one is missed, or cannot be applied because the code it breaks
changed (then update its edits here). Not part of `make test`: a few minutes on 2 cores.

    python tests/mutation_check.py [--only SUBSTRING] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "export", "server", "clients", "proto")  # workspace members: each holds one package


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old, new): each old text must occur exactly once in the file
    test: str  # the pytest node id that must fail


DRAIN_TEST = (
    "tests/server/test_drain.py::test_stop_drains_the_request_in_flight_refuses_new_calls_and_reports_not_serving"
)
SERVER_DEADLINE_TEST = (
    "tests/server/test_kserve_inputs.py::test_the_server_refuses_at_once_what_cannot_finish_before_the_deadline"
)
RESUME_TEST = "tests/clients/test_classify_cli.py::test_resume_replaces_a_failed_row_instead_of_adding_one"

BREAKAGES = [
    Breakage(
        "the clean file's per-image mask marks every image correct",
        "models/atop_models/evaluation/clean.py",
        (('row["correct_mask"] = encode_mask(hits)', 'row["correct_mask"] = "1" * len(hits)'),),
        "tests/models/test_evaluation.py::test_clean_accuracy_command_is_seeded_and_matches_the_classifier",
    ),
    Breakage(
        "the per-epoch PGD check attacks with a zero radius (reports clean accuracy as robust)",
        "models/atop_models/train/common.py",
        (
            (
                "attack = PGD(EOTGradient(model, eot), epsilon, 2.5 * epsilon / steps, steps)",
                "attack = PGD(EOTGradient(model, eot), 0.0, 0.0, steps)",
            ),
        ),
        "tests/models/test_pipeline_training.py::test_classifier_epochs_report_a_pgd_check_that_bites",
    ),
    Breakage(
        "compare cuts a larger run by a default data set instead of the one both runs record",
        "models/atop_models/evaluation/compare.py",
        (
            (
                "source = args.data_source or recorded_source(results_a, results_b)",
                'source = args.data_source or "cifar10"',
            ),
        ),
        "tests/models/test_compare.py::test_without_data_source_the_cut_uses_the_data_set_both_runs_record",
    ),
    Breakage(
        "draws averaged (N, draws) instead of (draws, N)",
        "server/atop_server/outputs.py",
        (
            (
                "per_draw = plain.reshape(draws, -1, plain.shape[-1])",
                "per_draw = plain.reshape(-1, draws, plain.shape[-1]).transpose(1, 0, 2)",
            ),
        ),
        "tests/server/test_core_rows.py::test_draws_are_averaged_per_image_across_parts_and_executions",
    ),
    Breakage(
        "UINT8 pixels given to a float model unscaled",
        "server/atop_server/core.py",
        ((".astype(np.float32) / np.float32(255.0)", ".astype(np.float32)"),),
        "tests/server/test_core_rows.py::test_uint8_pixels_reach_a_float_model_in_its_layout_and_scale",
    ),
    Breakage(
        # Cancelling the awaiting task cancels the parts' futures (asyncio.wrap_future chains it), and the core
        # cancels them again when it leaves: both must go for the work to stay queued.
        "the core awaits a request's parts without withdrawing them when it gives up",
        "server/atop_server/core.py",
        (
            ("asyncio.wrap_future(f) for f in futures", "asyncio.shield(asyncio.wrap_future(f)) for f in futures"),
            ("                f.cancel()  # after a timeout", "                pass  # after a timeout"),
        ),
        "tests/server/test_core_rows.py::test_queued_work_of_cancelled_and_expired_requests_never_runs",
    ),
    Breakage(
        "a lone request waits the queue delay for company",
        "server/atop_server/batcher.py",
        (("if full or not company or self._closed", "if full or self._closed"),),
        "tests/server/test_batcher.py::test_a_lone_request_runs_at_once_and_gets_its_rows",
    ),
    Breakage(
        "merged requests all get the first request's rows",
        "server/atop_server/batcher.py",
        (("                offset += len(item.images)\n", ""),),
        "tests/server/test_batcher.py::test_requests_queued_while_the_model_runs_are_merged_and_split_back",
    ),
    Breakage(
        "a request admitted part by part: refused partway, its first parts stay queued",
        "server/atop_server/batcher.py",
        (
            (
                """            self._admit(count, client, None if deadline is None else deadline - now)
            items = [_Item(part, Future(), deadline, now, client) for part in parts]
            self._queues.setdefault(client, deque()).extend(items)
            self._client_images[client] = self._client_images.get(client, 0) + count
            self._queued_images += count
""",
                """            items = []
            for part in parts:
                self._admit(len(part), client, None if deadline is None else deadline - now)
                items.append(_Item(part, Future(), deadline, now, client))
                self._queues.setdefault(client, deque()).append(items[-1])
                self._client_images[client] = self._client_images.get(client, 0) + len(part)
                self._queued_images += len(part)
""",
            ),
        ),
        "tests/server/test_batcher.py::test_a_request_refused_partway_through_its_parts_queues_none_of_them",
    ),
    Breakage(
        "the batcher runs queued work whose deadline passed",
        "server/atop_server/batcher.py",
        (("if item.deadline is not None and time.monotonic() > item.deadline:", "if False:"),),
        "tests/server/test_batcher.py::test_expired_and_cancelled_requests_are_skipped",
    ),
    Breakage(
        "the batcher runs queued work that was cancelled",
        "server/atop_server/batcher.py",
        (("if not item.future.set_running_or_notify_cancel():", "if item.future.cancelled() and False:"),),
        "tests/server/test_batcher.py::test_expired_and_cancelled_requests_are_skipped",
    ),
    Breakage(
        "stopping without turning health NOT_SERVING",
        "server/atop_server/app.py",
        (("NOT_SERVING)\n        # After the grace", "SERVING)\n        # After the grace"),),
        DRAIN_TEST,
    ),
    Breakage(
        "stopping without a grace period: the request in flight is cancelled",
        "server/atop_server/app.py",
        (("self.grpc.stop(self.config.grace_seconds)", "self.grpc.stop(0)"),),
        DRAIN_TEST,
    ),
    Breakage(
        "the probe command exits 0 whatever the status",
        "server/atop_server/healthcheck.py",
        (("sys.exit(0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1)", "sys.exit(0)"),),
        DRAIN_TEST,
    ),
    Breakage(
        "the probe command ignores ATOP_HEALTH_PORT",
        "server/atop_server/healthcheck.py",
        (("port = health_port if health_port.isdigit() else", "port ="),),
        DRAIN_TEST,
    ),
    Breakage(
        "typed UINT8 contents above 255 are not refused (they wrap or fail inside)",
        "server/atop_server/kserve.py",
        (('if tensor.datatype == "UINT8" and values and max(values) > 255:', "if False:"),),
        "tests/server/test_kserve_inputs.py::test_typed_contents_that_do_not_fit_are_invalid",
    ),
    Breakage(
        "typed UINT8 contents read as FP32",
        "server/atop_server/kserve.py",
        (('dtype=np.uint8 if tensor.datatype == "UINT8" else np.float32', "dtype=np.float32"),),
        "tests/server/test_kserve_inputs.py::test_typed_fp32_and_uint8_contents_reach_the_model_in_order",
    ),
    Breakage(
        "the core does not bound the images of a request",
        "server/atop_server/core.py",
        (("if count > self.config.max_images_per_request:", "if False:"),),
        "tests/server/test_kserve_inputs.py::test_images_per_request_are_bounded_in_both_apis",
    ),
    Breakage(
        "the server ignores the client's deadline",
        "server/atop_server/servicing.py",
        (("return Call(client=context.peer(), deadline=deadline)", "return Call(client=context.peer())"),),
        SERVER_DEADLINE_TEST,
    ),
    Breakage(
        "admission does not weigh a request's own work against its deadline",
        "server/atop_server/batcher.py",
        (("if time_left is not None and own > time_left:", "if False:"),),
        SERVER_DEADLINE_TEST,
    ),
    Breakage(
        "atop-serve dies on SIGTERM instead of draining",
        "server/atop_server/cli.py",
        (("    signal.signal(signal.SIGTERM, on_signal)\n", ""),),
        "tests/triton/test_kserve_tritonclient.py::test_sigterm_drains_a_request_in_flight_then_exits_0",
    ),
    Breakage(
        "the batch-size histogram records executions, not their images",
        "server/atop_server/metrics.py",
        (("self.batch_size.labels(model).observe(execution.batch_size)", "self.batch_size.labels(model).observe(1)"),),
        "tests/triton/test_kserve_tritonclient.py::test_concurrent_requests_are_batched_and_counted_in_the_metrics",
    ),
    Breakage(
        "ATOP_* variables are not read",
        "server/atop_server/cli.py",
        (("    if variable not in os.environ:\n", "    if True:\n"),),
        "tests/server/test_cli_environment.py::test_every_option_is_read_from_its_variable_into_its_field",
    ),
    Breakage(
        "two queue bounds wired into each other's fields",
        "server/atop_server/cli.py",
        (
            (
                "args.max_queue_size,\n                args.max_client_queue_size,",
                "args.max_client_queue_size,\n                args.max_queue_size,",
            ),
        ),
        "tests/server/test_cli_environment.py::test_every_option_is_read_from_its_variable_into_its_field",
    ),
    Breakage(
        "the client does not retry RESOURCE_EXHAUSTED",
        "clients/atop_clients/client.py",
        (("grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)", "grpc.StatusCode.UNAVAILABLE,)"),),
        "tests/clients/test_classify_cli.py::test_client_retries_unavailable_and_resource_exhausted_then_succeeds",
    ),
    Breakage(
        "the client sends FP32 pixels unscaled",
        "clients/atop_clients/protocol.py",
        (('.astype("<f4") / np.float32(255)', '.astype("<f4")'),),
        "tests/clients/test_classify_cli.py::test_the_client_decodes_for_servers_that_take_pixels_only",
    ),
    Breakage(
        "the client decodes images as BGR",
        "clients/atop_clients/protocol.py",
        (("return rgb_array(image, height, width)", "return rgb_array(image, height, width)[..., ::-1]"),),
        "tests/clients/test_classify_cli.py::test_the_client_decodes_for_servers_that_take_pixels_only",
    ),
    Breakage(
        "--resume keeps failed rows instead of retrying them",
        "clients/atop_clients/output.py",
        (('        if row["error"]:\n            continue\n', ""),),
        RESUME_TEST,
    ),
    Breakage(
        "Ctrl-C ends atop-classify as a success",
        "clients/atop_clients/cli.py",
        (("        code = INTERRUPTED\n", "        code = 0\n"),),
        "tests/clients/test_classify_cli.py::test_ctrl_c_stops_cleanly_keeps_the_rows_and_says_how_to_resume",
    ),
    Breakage(
        "--resume classifies every input again",
        "clients/atop_clients/cli.py",
        (("todo = [item for item in items if item.key not in previous.keys]", "todo = list(items)"),),
        RESUME_TEST,
    ),
    Breakage(
        "the defense rt+atop built without its purifier (RT's holes left unfilled)",
        "models/atop_models/evaluation/defenses.py",
        (('if base == "rt":', 'if base in ("rt", "rt+atop"):'),),
        "tests/models/test_zoo.py::test_the_served_pipeline_keeps_its_floor_on_seed_0_draws",
    ),
    Breakage(
        "the classification extension ranks worst first",
        "server/atop_server/kserve.py",
        (('np.argsort(-probabilities, axis=1, kind="stable")[:, :k]', "np.argsort(probabilities, axis=1)[:, :k]"),),
        "tests/server/test_kserve_inputs.py::test_the_classification_extension_ranks_every_image_best_first",
    ),
    Breakage(
        "a failed request on a stream is answered without its id",
        "server/atop_server/kserve.py",
        (("infer_response=pb.ModelInferResponse(id=request.id)", "infer_response=pb.ModelInferResponse()"),),
        "tests/server/test_kserve_inputs.py::test_a_stream_answers_each_request_in_order_and_goes_on_after_a_failure",
    ),
    Breakage(
        "the summary of a resumed run counts this run's rows only",
        "clients/atop_clients/cli.py",
        (("tally, failures = dataclasses.replace(previous.tally), []", "tally, failures = Tally(), []"),),
        "tests/clients/test_classify_cli.py::test_tar_input_jsonl_and_resume",
    ),
    Breakage(
        "a resumed epoch's train_seconds drops the time it ran before the kill",
        "models/atop_models/train/loop.py",
        (("started = time.monotonic() - seconds_before", "started = time.monotonic()"),),
        "tests/models/test_training.py::test_interrupted_run_resumes_mid_epoch",
    ),
    Breakage(
        "Triton's request parameter timeout ignored",
        "server/atop_server/kserve.py",
        (("                call = call.within(timeout_us / 1e6)", "                pass"),),
        "tests/server/test_kserve_inputs.py::test_the_server_refuses_at_once_what_cannot_finish_before_the_deadline",
    ),
    # The server's hardening (its defences against hostile or careless clients):
    Breakage(
        "hardening: a second server may share a busy port",
        "server/atop_server/app.py",
        (("if port and not port_is_free(host, port):", "if False:"),),
        "tests/server/test_hardening.py::test_busy_ports_are_refused_in_one_line",
    ),
    Breakage(
        "hardening: no bound on a request's decoded pixels",
        "server/atop_server/core.py",
        (("if total > self.config.max_request_pixels:", "if False:"),),
        "tests/server/test_core.py::test_decoded_pixels_are_bounded_per_request_and_in_flight",
    ),
    Breakage(
        "hardening: decoding goes on past the deadline",
        "server/atop_server/core.py",
        (('call.check_deadline("while its images were decoded")', "pass"),),
        "tests/server/test_core.py::test_decoding_checks_the_deadline_between_images",
    ),
    Breakage(
        "hardening: a bearer token's prefix is not checked",
        "server/atop_server/auth.py",
        (('if not authorization[0].startswith("Bearer "):', "if False:"),),
        "tests/server/test_security.py::test_tokens_guard_every_rpc_but_health",
    ),
    Breakage(
        "hardening: metrics open to anyone despite tokens",
        "server/atop_server/metrics.py",
        (("if auth.tokens and not auth.public_metrics else None", "if False else None"),),
        "tests/server/test_security.py::test_metrics_need_a_token_unless_public",
    ),
    Breakage(
        "atop-eval resumes a row measured on other checkpoints",
        "models/atop_models/evaluation/runner.py",
        (("_check_resumable(record, stamp, progress, row, batch)", "pass"),),
        "tests/models/test_evaluation.py::test_atop_eval_writes_report_and_resumes",
    ),
    Breakage(
        "the ablation's series figure is never drawn",
        "models/atop_models/evaluation/ablation.py",
        (('if any(r["x"] is not None for r in rows):', "if False:"),),
        "tests/models/test_ablation.py::test_ablation_table_and_plot",
    ),
    Breakage(
        "DDP ranks train apart (gradients not averaged)",
        "models/atop_models/runtime.py",
        (("return DistributedDataParallel(model, device_ids=device_ids)", "return model"),),
        "tests/models/test_ddp.py::test_two_process_ddp_training",
    ),
    Breakage(
        "the training step ignores --precision (never bf16)",
        "models/atop_models/train/classifier.py",
        (("dtype=torch.bfloat16, enabled=bf16)", "dtype=torch.bfloat16, enabled=False)"),),
        "tests/models/test_training.py::test_the_training_step_runs_at_the_precision_asked_for",
    ),
    Breakage(
        "a run folder from before a setting existed no longer resumes",
        "models/atop_models/train/run_dir.py",
        (('previous["config"] = _with_defaults(previous["config"], _as_json(type(config)()))', "pass"),),
        "tests/models/test_training.py::test_a_run_from_before_a_setting_existed_resumes_at_its_default",
    ),
    Breakage(
        "a checkpoint stored in fp16 keeps its weights in fp32",
        "models/atop_models/checkpoint.py",
        (("tensors = model.half().state_dict() | int8", "tensors = model.state_dict() | int8"),),
        "tests/models/test_checkpoint.py::test_a_checkpoint_stored_in_fp16_loads_the_rounded_weights_at_half_the_bytes",
    ),
    Breakage(
        "an int8 checkpoint loads its int8 values without their scales",
        "models/atop_models/checkpoint.py",
        (("return q.float() * _per_channel(scale, q)", "return q.float()"),),
        "tests/models/test_checkpoint.py::"
        "test_a_checkpoint_stored_in_int8_loads_per_channel_rounded_weights_at_a_quarter_of_the_bytes",
    ),
    Breakage(
        "the exporter widens an fp16- or int8-stored part's weights in the file",
        "export/atop_export/exporter.py",
        (('if stored_parts and precision == "fp32":', "if False:"),),
        "tests/export/test_exporter.py::test_a_part_stored_in_fewer_bytes_keeps_its_weights_so_in_the_served_graph",
    ),
    Breakage(
        "the exporter keeps the stored dtype for the classifier only",
        "export/atop_export/exporter.py",
        (
            (
                '(("classifier", loaded.classifier), ("purifier", loaded.purifier))',
                '(("classifier", loaded.classifier),)',
            ),
        ),
        "tests/export/test_exporter.py::test_a_part_stored_in_fewer_bytes_keeps_its_weights_so_in_the_served_graph",
    ),
    Breakage(
        "a mixture ignores its weight",
        "models/atop_models/classifiers/mixture.py",
        (
            (
                "return mix_log_probabilities(robust, accurate, self.weight, self.sharpness)",
                "return mix_log_probabilities(robust, accurate, 0.5, self.sharpness)",
            ),
        ),
        "tests/models/test_classifiers.py::test_a_mixture_serves_log_probabilities_of_its_weighted_members",
    ),
    Breakage(
        "a member taken out of a quantized checkpoint is widened to fp32",
        "models/atop_models/checkpoint.py",
        (
            (
                "    stored = _checked_tensors(source, record)\n",
                '    stored = load_model(source, "classifier")[0].state_dict()\n',
            ),
        ),
        "tests/models/test_classifiers.py::test_a_member_comes_out_of_a_combined_checkpoint_as_it_is_stored",
    ),
    Breakage(
        "the robust-member attack attacks the whole mixture",
        "models/atop_models/evaluation/named_attacks.py",
        (("defense.purifier, classifier.robust, defense.config)", "defense.purifier, classifier, defense.config)"),),
        "tests/models/test_evaluation.py::"
        "test_the_robust_member_attack_runs_pgd_eot_through_the_pipeline_on_the_mixtures_robust_member",
    ),
    Breakage(
        "the shipped graph keeps PyTorch's stack traces",
        "export/atop_export/exporter.py",
        (("model = strip_build_records(optimize_offline(", "model = (optimize_offline("),),
        "tests/export/test_exporter.py::test_no_model_carries_records_of_the_machine_it_was_built_on",
    ),
]


def copy_tree(target: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored) in target/repo, with ../shared
    beside it as the checkout has it (the tests read CIFAR-10 from there)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    root = target / "repo"
    for name in filter(None, listed):
        source = REPO / name.decode()
        if source.is_file():
            (root / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name.decode())
    if (REPO.parent / "shared").exists():
        (target / "shared").symlink_to(REPO.parent / "shared")
    return root


def environment(root: Path) -> dict[str, str]:
    """The copy's packages ahead of the editable installs of the checkout's."""
    paths = [str(root / package) for package in PACKAGES]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def pytest(root: Path, tests: list[str]) -> subprocess.CompletedProcess:
    # One process per run, tests/triton included (its protobuf clash is with our own tests, not run beside it).
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    return subprocess.run(command, cwd=root, env=environment(root), capture_output=True, text=True)


def check_imports(root: Path) -> None:
    probe = "import atop_server, atop_models, atop_clients; print(atop_server.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env=environment(root), capture_output=True, text=True)
    if not where.stdout.strip().startswith(str(root)):
        raise SystemExit(f"mutation-check: the copy's packages are not imported ({where.stdout}{where.stderr})")


def apply(root: Path, breakage: Breakage) -> str:
    """Break the copy; returns the file's original text."""
    path = root / breakage.path
    original = broken = path.read_text()
    for old, new in breakage.edits:
        if broken.count(old) != 1:
            raise LookupError(f"{breakage.path} holds {old!r} {broken.count(old)} times, not once")
        broken = broken.replace(old, new)
    path.write_text(broken)
    return original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the breakages whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args()
    chosen = [b for b in BREAKAGES if args.only in b.name]
    if not chosen:
        parser.error(f"no breakage's name contains {args.only!r}")
    target = Path(tempfile.mkdtemp(prefix="atop-mutation-"))
    try:
        root = copy_tree(target)
        check_imports(root)
        tests = sorted({b.test for b in chosen})
        # tests/triton cannot share a process with the other tests (tritonclient's protobuf names clash).
        triton = [t for t in tests if t.startswith("tests/triton/")]
        for group in filter(None, (triton, [t for t in tests if t not in triton])):
            baseline = pytest(root, group)
            if baseline.returncode != 0:
                raise SystemExit(f"mutation-check: the tests fail without any breakage:\n{baseline.stdout[-4000:]}")
        results = []
        for breakage in chosen:
            started = time.monotonic()
            try:
                original = apply(root, breakage)
            except LookupError as error:
                results.append(("CANNOT APPLY", breakage, str(error)))
                continue
            try:
                run = pytest(root, [breakage.test])
            finally:
                (root / breakage.path).write_text(original)
            verdict = "caught" if run.returncode != 0 else "MISSED"
            results.append((verdict, breakage, f"{time.monotonic() - started:.0f} s"))
            print(f"{verdict:12} {breakage.name} ({breakage.test})", flush=True)
    finally:
        if args.keep:
            print(f"the copy: {target}")
        else:
            shutil.rmtree(target)
    caught = sum(verdict == "caught" for verdict, _, _ in results)
    print(f"\n{caught} of {len(results)} breakages caught")
    for verdict, breakage, detail in results:
        if verdict != "caught":
            print(f"{verdict}: {breakage.name} in {breakage.path}: {detail} ({breakage.test})")
    sys.exit(0 if caught == len(results) else 1)


if __name__ == "__main__":
    main()
