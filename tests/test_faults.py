"""The fault and soak script (bench/faults.py) in its quick form: every scenario tries inputs and finds nothing bad.

It drives the real index.py, query_online.py, evaluate.py and server.py (loopback only, no downloads) and exits 1
when any scenario counts a 5xx, a hang, a traceback, a crash, lost data or a failed check."""

import json
import subprocess
import sys

from conftest import REPO

BAD_KEYS = ("http_5xx", "hangs", "tracebacks", "crashes", "data_lost", "failed_checks")


def test_quick_fault_run_finds_no_5xx_hang_traceback_crash_or_lost_data(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.faults", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    report_file = tmp_path / "faults.json"
    assert report_file.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text("utf-8"))
    failures = [f"{row['number']}. {row['scenario']}: {failure}" for row in report["rows"] for failure in row["failures"]]
    assert result.returncode == 0, "\n".join(failures) or result.stderr[-3000:]
    assert report["bad_keys"] == list(BAD_KEYS)
    assert sorted(row["number"] for row in report["rows"]) == list(range(1, 9))
    for row in report["rows"]:
        if row["skipped"]:  # only the disk-full row may be skipped (no root, no tmpfs), and it must say why
            assert row["number"] == 8 and row["skipped"].strip(), row
            continue
        assert row["tried"] > 0, row
        assert {key: row[key] for key in BAD_KEYS} == dict.fromkeys(BAD_KEYS, 0), row["failures"]
    assert report["bad"] == 0
    assert (tmp_path / "faults.md").read_text("utf-8").count("| ") > 8
