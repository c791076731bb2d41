"""The ``lbgen`` command: one verb table, user errors as one message, bugs with their traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lbgen import commands
from lbgen.cli import STAGE_VERBS, is_user_error


def _lbgen(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "lbgen", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_every_verb_is_in_the_one_table():
    assert set(commands.VERBS) == {*STAGE_VERBS, "experiment", "summary", "shard-folder",
                                   "imagefolder-from-labels"}
    with pytest.raises(SystemExit, match="unknown command 'fitt'"):
        commands.main(["fitt"])


def test_a_bad_input_is_one_message_without_traceback(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = _lbgen("export", str(missing), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "lbgen: error:" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    shown = _lbgen("export", str(missing), str(tmp_path / "out"), env={"LBGEN_DEBUG": "1"})
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "FileNotFoundError" in shown.stderr


def test_only_lbgens_own_raise_statements_count_as_user_errors():
    def lbgen_style():
        from lbgen.storage.files import read_json

        return read_json("/nonexistent/file.json", "fix it")  # open() raises inside pathlib: not lbgen's message

    with pytest.raises(FileNotFoundError) as raised:
        lbgen_style()
    assert not is_user_error(raised.value)  # a library's error: keep the traceback
    from lbgen.datamodules.requests import GenerationRequestsDataModule

    with pytest.raises(ValueError) as refused:
        GenerationRequestsDataModule(class_names=["a", "b"], images_per_class=0)
    assert is_user_error(refused.value)  # lbgen's own message about the input
    try:
        int("not a number")
    except ValueError as err:
        assert not is_user_error(err)  # raised by Python, not by an lbgen raise statement


def test_summary_verb_tables_tested_runs(tmp_path, capsys, monkeypatch):
    for i, acc in enumerate((0.5, 0.7)):
        (tmp_path / "real" / f"version_{i}").mkdir(parents=True)
        (tmp_path / "real" / f"version_{i}" / "test_metrics.json").write_text(json.dumps({"acc": acc}))
    monkeypatch.chdir(tmp_path)
    commands.main(["summary", "real only=real"])
    assert "| real only | **60.00 ± 127.06** | - | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="usage: lbgen summary"):
        commands.main(["summary", "no-equals-sign"])
