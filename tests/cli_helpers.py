"""The CLI run in-process, as the safety tests use it: ``run`` gives (exit status, stderr), and
``fails`` checks the one-line error contract (status 2, one ``ffn: error:`` line naming each
of ``needles``)."""

from __future__ import annotations

from floodfilling.cli import main


def run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def fails(argv, capsys, *needles) -> str:
    rc, err = run(argv, capsys)
    assert rc == 2, err
    assert err.startswith("ffn: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err
