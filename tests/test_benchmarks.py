"""benchmarks/README.md is the record: every result file loads into the one schema and is cited there, every cited
file exists, and no script edits sys.path itself (they import perf_common, which does it once)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture
def perf_common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import perf_common
    return perf_common


def cited_files():
    return set(re.findall(r"`([a-z0-9_]+\.(?:json|png))`", (ROOT / "benchmarks" / "README.md").read_text()))


def test_every_result_file_has_the_schema(perf_common):
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for path in files:
        result = perf_common.load_results(path)
        assert set(result) == {*perf_common.SCHEMA, "extra"}, path.name
        assert all(result[key] for key in ("benchmark", "device", "date", "commit", "torch")), path.name
        assert isinstance(result["rows"], list) and result["rows"], path.name
        assert all(isinstance(row, dict) for row in result["rows"]), path.name
        assert (ROOT / "benchmarks" / f"{result['benchmark']}.py").is_file(), (path.name, result["benchmark"])


def test_results_and_the_readme_agree():
    on_disk = {path.name for path in RESULTS.iterdir()}
    cited = cited_files()
    assert on_disk - cited == set(), "result files not cited in benchmarks/README.md"
    assert cited - on_disk == set(), "benchmarks/README.md cites result files that are not there"


def test_load_results_normalises_the_older_spellings(perf_common, tmp_path):
    path = tmp_path / "generate_profile.json"
    path.write_text('{"device": "H100", "date": "2026-11-22", "git_commit": "abc", "torch": "2.11", '
                    '"python": "3.11", "results": {"b16": {"tokens_per_s": 5.0}}}')
    result = perf_common.load_results(path)
    assert result["benchmark"] == "generate" and result["commit"] == "abc"
    assert result["rows"] == [{"name": "b16", "tokens_per_s": 5.0}] and result["extra"] == {"python": "3.11"}


def test_no_script_edits_sys_path():
    for script in (ROOT / "benchmarks").glob("*.py"):
        if script.name != "perf_common.py":
            assert "sys.path." not in script.read_text(), f"{script.name}: import perf_common instead"
