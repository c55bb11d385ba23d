"""A short coverage-guided fuzz run (atheris) of the decode path: a client's bytes are decoded or refused with
InvalidInput, nothing else (tests/fuzz/fuzz_decode.py says what is checked). `make fuzz` runs it for longer.
Removing one of the codec's error mappings (e.g. ValueError) is found within a minute; this run is shorter,
so it guards against crashes on the seed formats and their near mutations, and keeps the harness working."""

import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_decode.py"


def test_decoding_fuzzed_bytes_raises_nothing_but_invalid_input(tmp_path):
    run = subprocess.run(
        [sys.executable, str(HARNESS), str(tmp_path / "corpus"), "-max_total_time=15", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not crashes, f"{crashes}\n{run.stderr[-4000:]}"
    assert len(list((tmp_path / "corpus").iterdir())) >= 14  # the seed formats at least: the harness really ran
