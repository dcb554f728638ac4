"""What a user sees at the command line: one `madpo: error:` line (exit 2, no traceback) for a user error, the
traceback for a bug or with MADPO_DEBUG=1 / --debug, the data report on stdout, and no per-run noise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from madpo.data.formats import load_files
from madpo.data.jsoncheck import json_problem
from madpo.errors import EXIT_USER_ERROR, UserError, find_user_error, report_user_error
from tests.helpers import cli_env, run_cli_subprocess, scalars, tiny_args

FAST = ("--trainer.max_steps=1", "--trainer.limit_val_batches=1")
PAIRS = [
    {"prompt": "The film", "chosen": " was great.", "rejected": " was awful."},
    {"prompt": "This movie", "chosen": " moved me.", "rejected": " bored me."},
    {"prompt": "The plot", "chosen": " is clever.", "rejected": " is thin."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env(**extra: str) -> dict[str, str]:
    out = cli_env(**extra)
    if "MADPO_DEBUG" not in extra:
        out.pop("MADPO_DEBUG", None)
    return out


def fails_cleanly(tmp_path: Path, *extra: str) -> str:
    """Runs a tiny fit that must fail with a user error; returns its stderr."""
    proc = run_cli_subprocess(tiny_args("dpo.yaml", tmp_path, *FAST, *extra), env=env(), returncode=EXIT_USER_ERROR)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("madpo: error: ")]
    return line


# ----------------------------------------------------------------------------------------------------------------
# user errors at the command line (subprocesses; each fails before training)
# ----------------------------------------------------------------------------------------------------------------


def test_missing_train_file(tmp_path):
    line = fails_cleanly(tmp_path, f"--data.train_files={tmp_path / 'nope.jsonl'}")
    assert "nope.jsonl" in line and "does not exist" in line


def test_empty_jsonl(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    line = fails_cleanly(tmp_path, f"--data.train_files={tmp_path / 'empty.jsonl'}")
    assert "empty.jsonl" in line and "no rows" in line


def test_malformed_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", PAIRS)
    lines = path.read_text().splitlines()
    lines.insert(2, '{"prompt": "a", "chosen": ')
    path.write_text("\n".join(lines) + "\n")
    line = fails_cleanly(tmp_path, f"--data.train_files={path}")
    assert "bad.jsonl" in line and "line 3" in line and "invalid JSON" in line


def test_row_missing_chosen_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [PAIRS[0], {"prompt": "a", "rejected": " b"}])
    line = fails_cleanly(tmp_path, f"--data.train_files={path}")
    assert "rows.jsonl: row 1: field 'chosen'" in line and "missing or null" in line


def test_wrong_model_path(tmp_path):
    line = fails_cleanly(tmp_path, f"--model.init_args.model_name_or_path={tmp_path / 'no-such-model'}")
    assert "no-such-model" in line and "does not exist" in line


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = tiny_args("dpo.yaml", tmp_path, *FAST, f"--data.train_files={tmp_path / 'nope.jsonl'}")
    if how == "flag":
        args.append("--debug")
    proc = run_cli_subprocess(args, env=env(MADPO_DEBUG="1") if how == "env" else env(), returncode=1)
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr and "nope.jsonl" in proc.stderr
    assert "madpo: error:" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# a normal fit: the data report, no LightningCLI `args` warning, no hp_metric placeholder
# ----------------------------------------------------------------------------------------------------------------


def test_fit_reports_truncation_and_prints_no_noise(tmp_path):
    rows = [*PAIRS, {"prompt": "word " * 300, "chosen": " yes.", "rejected": " no."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = tiny_args(
        "dpo.yaml", tmp_path, f"--data.train_files={path}", f"--data.val_files={path}", "--trainer.max_epochs=1"
    )
    proc = run_cli_subprocess(args, env=env())
    report = [x for x in proc.stdout.splitlines() if x.startswith("[madpo] train: ")]
    assert len(report) == 1, proc.stdout
    assert f"4 rows (preference, {path})" in report[0] and "0 dropped" in report[0]
    assert re.search(r"; 1 prompt truncated to 16 tokens \(longest \d{3}\); 0 completions truncated", report[0])
    assert "[madpo] warning: train: truncation cut 25% of the prompts" in proc.stderr
    assert "LightningCLI's args parameter" not in proc.stderr
    assert "LeafSpec" not in proc.stderr and "litlogger" not in proc.stderr
    tags = scalars(tmp_path / "runs")
    assert "hp_metric" not in tags
    assert any(t.startswith("hparams/val/") for t in tags), sorted(tags)  # the real final metrics


# ----------------------------------------------------------------------------------------------------------------
# in-process: which exceptions are user errors, and the data file checks
# ----------------------------------------------------------------------------------------------------------------


def _raised(fn) -> BaseException:  # noqa: ANN001
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_user_errors_and_bugs_are_told_apart():
    from madpo.data import PreferenceDataModule

    assert find_user_error(UserError("bad row")) is not None
    madpo_check = _raised(lambda: PreferenceDataModule(tokenizer="t", val_fraction=2.0))  # a `raise` in madpo
    assert type(madpo_check) is ValueError and find_user_error(madpo_check)[1].startswith("val_fraction")
    assert find_user_error(_raised(lambda: int("x"))) is None  # a ValueError from elsewhere: a bug
    assert find_user_error(_raised(lambda: None.split())) is None
    assert find_user_error(FileNotFoundError("no such file")) is not None

    def wrapped() -> None:  # as jsonargparse wraps a failing __init__
        try:
            raise OSError("model path 'x' does not exist")
        except OSError as e:
            raise ValueError("Does not validate against any of the Union subtypes") from e

    assert find_user_error(_raised(wrapped))[1] == "model path 'x' does not exist"

    def bug_while_handling() -> None:  # __context__ is not followed: the AttributeError is a new problem
        try:
            raise UserError("bad row")
        except UserError:
            None.split()

    assert find_user_error(_raised(bug_while_handling)) is None


def test_stage_errors_count_by_their_cause():
    from madpo.pipeline.stages import StageError

    def stage(cause: BaseException) -> BaseException:
        try:
            raise cause
        except BaseException as e:  # noqa: BLE001
            try:
                raise StageError(f"stage reward: {e}") from e
            except StageError as s:
                return s

    assert find_user_error(stage(UserError("p.jsonl: row 1: field 'chosen' is None")))[1] == (
        "stage reward: p.jsonl: row 1: field 'chosen' is None"
    )
    assert find_user_error(stage(TypeError("unsupported operand"))) is None
    assert find_user_error(StageError("stage policy: method madpo needs the tier's reward model")) is not None


def test_report_prints_one_line_on_rank_zero_only(capsys, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.delenv("MADPO_DEBUG", raising=False)
    assert report_user_error(UserError("p.jsonl: no rows")) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "madpo: error: p.jsonl: no rows\n"
    assert report_user_error(TypeError("a bug")) is None
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert report_user_error(UserError("p.jsonl: no rows")) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MADPO_DEBUG", "1")
    assert report_user_error(UserError("p.jsonl: no rows")) is None


def test_json_problems_name_line_and_column(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    assert json_problem(str(path)) == "line 3, column 12: invalid JSON (Expecting value)"
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    assert json_problem(str(path)).startswith("line 2: expected a JSON object")
    path.write_text("\n  \n")
    assert json_problem(str(path)) == "no rows (every line is blank)"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    assert json_problem(str(path)) == "line 2: not UTF-8 text (invalid start byte)"
    doc = tmp_path / "b.json"
    doc.write_text('[\n  {"prompt": "a"},\n  {"prompt" "b"}\n]\n')
    assert json_problem(str(doc)) == "line 3, column 13: invalid JSON (Expecting ':' delimiter)"
    doc.write_text('[{"prompt": "a"}]')
    assert json_problem(str(doc)) is None
    doc.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')  # JSON lines in a .json file
    assert json_problem(str(doc)) is None


def test_load_files_refuses_empty_and_malformed_files(tmp_path):
    cache = str(tmp_path / "hf")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"empty\.jsonl: the file is empty: no rows"):
        load_files(str(tmp_path / "empty.jsonl"), cache_dir=cache)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"blank\.jsonl: .*no rows"):
        load_files(str(tmp_path / "blank.jsonl"), cache_dir=cache)
    bad = write_jsonl(tmp_path / "bad.jsonl", PAIRS)
    bad.write_text(bad.read_text() + "{oops}\n")
    with pytest.raises(UserError, match=r"bad\.jsonl: could not be read as json: line 4, column 2: invalid JSON"):
        load_files(str(bad), cache_dir=cache)
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserError, match=r"h\.csv: .*no rows"):
        load_files(str(header_only), cache_dir=cache)
