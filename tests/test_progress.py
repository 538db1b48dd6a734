"""The run log: the `imgclf` logger prints on stderr by default, appends to files, and can be routed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from imgclf.progress import CONSOLE, log, log_to_file


def test_log_prints_the_line_on_stderr_and_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log("epoch 1/5: val accuracy 0.9000")
    captured = capsys.readouterr()
    assert captured.err == "epoch 1/5: val accuracy 0.9000\n" and captured.out == ""


def test_log_to_file_appends_timestamped_lines_while_the_block_runs(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text("earlier run\n", encoding="utf-8")
    with log_to_file(path):
        log("first")
    log("after the block")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "earlier run" and len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d first", lines[1])


def test_a_library_user_can_route_the_lines(caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("imgclf")
    logger.removeHandler(CONSOLE)
    logger.addHandler(caplog.handler)
    try:
        log("routed")
    finally:
        logger.removeHandler(caplog.handler)
        logger.addHandler(CONSOLE)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [("imgclf", "INFO", "routed")]
    assert capsys.readouterr().err == ""
