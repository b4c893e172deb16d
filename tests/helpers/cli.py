"""The `effarch` command line run in-process by the tests."""

from effarch.train.main import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `effarch *argv`."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, *, alone: bool = False) -> str:
    """The single `effarch: error:` line of stderr, with no traceback; `alone`: and nothing else on stderr (otherwise
    other lines, such as the device notice, may come before it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("effarch: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not alone or len(lines) == 1, err
    return errors[0]
