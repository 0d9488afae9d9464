from bnexport.errors import first_line


def test_first_line_keeps_one_line_and_names_silent_errors():
    assert first_line(RuntimeError("\n  first problem  \nsecond line\n")) == "first problem"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10
