"""The one error policy of the vrn-* commands (vrn/cli/command.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vrn.cli.command import UsageError, run_command
from vrn.errors import WeightsError
from vrn.signals import Terminated


def _run(body, argv=()):
    return run_command("vrn-test", argparse.ArgumentParser(prog="vrn-test"), body, list(argv))


@pytest.mark.parametrize("exc,code,line", [
    (WeightsError("w.t7: weights file not found"), 1, "vrn-test: w.t7: weights file not found"),
    (UsageError("--frames must be >= 1"), 2, "vrn-test: --frames must be >= 1"),
    (FileNotFoundError(2, "No such file or directory", "x.png"), 1,
     "vrn-test: x.png: No such file or directory"),
    (NotADirectoryError(20, "Not a directory", "f/run"), 1, "vrn-test: f/run: Not a directory"),
    (KeyboardInterrupt(), 130, "vrn-test: interrupted"),
    (Terminated(), 143, "vrn-test: terminated"),
])
def test_errors_are_one_line_with_their_exit_code(exc, code, line, capsys):
    def body(args):
        raise exc

    assert _run(body) == code
    err = capsys.readouterr().err
    assert err.strip() == line


def test_unexpected_error_names_its_traceback_file(capsys):
    def body(args):
        raise RuntimeError("boom\nsecond line")

    assert _run(body) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unexpected RuntimeError: boom second line" in err
    log = Path(err.split("traceback in ")[1].split(";")[0])
    try:
        text = log.read_text()
        assert "Traceback" in text and "RuntimeError: boom" in text
    finally:
        log.unlink()
    assert _run(body, ["--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_usage_errors_from_argparse_exit_2():
    with pytest.raises(SystemExit) as info:
        _run(lambda args: 0, ["--no-such-flag"])
    assert info.value.code == 2


@pytest.mark.parametrize("module", ["reconstruct", "live", "eval", "train", "convert",
                                    "export", "bench"])
def test_every_command_takes_debug(module, capsys):
    import importlib

    main = importlib.import_module(f"vrn.cli.{module}").main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--debug" in capsys.readouterr().out
