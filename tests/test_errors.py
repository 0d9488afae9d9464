from bnexport.errors import first_line


def test_first_line_keeps_one_line_and_names_silent_errors():
    assert first_line(RuntimeError("\n  first problem  \nsecond line\n")) == "first problem"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10
    assert first_line(RuntimeError("step \x1b[96m3/3\x1b[0m failed")) == "step 3/3 failed"


def test_each_error_class_has_the_exit_status_the_cli_documents():
    from bnexport.errors import (BnexportError, CheckFailed, DistributedFailure, SharedError, exit_code_for,
                                 reported_here)

    assert [exit_code_for(err) for err in (CheckFailed("differ"), BnexportError("bad"), SharedError("bad"),
                                           DistributedFailure("peer"), KeyboardInterrupt())] == [1, 2, 2, 3, 130]
    assert exit_code_for(ValueError("a bug")) == 1  # what Python itself exits with on an uncaught exception
    # under torchrun, an error every rank shares is printed once, by rank 0; a peer failure by every rank
    assert not reported_here(SharedError("x"), {"RANK": "1"}) and reported_here(SharedError("x"), {"RANK": "0"})
    assert reported_here(DistributedFailure("x"), {"RANK": "1"})
