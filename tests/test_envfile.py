"""env_files: systemd's EnvironmentFile= syntax, rule by rule as systemd.exec(5) states
it (each case quotes the rule it checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supd.envfile import EnvFileError, load, parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # "newline-separated variable assignments"
        ("FOO=bar\nBAZ=qux\n", [("FOO", "bar"), ("BAZ", "qux")]),
        # "Empty lines, lines without an "=" separator, or lines starting with ";" or
        # "#" will be ignored"
        ("\n\nNOEQUALS\n# FOO=no\n; BAR=no\nOK=1", [("OK", "1")]),
        ("   # indented comment\nA=1", [("A", "1")]),
        # "Leading and trailing whitespace (space, tab, carriage return) is discarded,
        # but interior whitespace within the line is preserved verbatim"
        ("A=  one  two\t \r\n", [("A", "one  two")]),
        # "quotes after the first non-whitespace character are preserved"
        ('A=it\'s "here"\n', [("A", 'it\'s "here"')]),
        # "A line ending with a backslash will be continued to the following one, with
        # the newline itself discarded"
        ("A=one\\\ntwo\n", [("A", "onetwo")]),
        # "A backslash followed by any character other than newline will preserve the
        # following character, so that "\\" will become the value "\""
        ("A=\\\\\nB=\\$HOME\\ x\n", [("A", "\\"), ("B", "$HOME x")]),
        # an escaped blank is not trailing whitespace
        ("A=x\\ \n", [("A", "x ")]),
        # "a "'"-quoted value ... can span multiple lines and contain any character
        # verbatim other than single quote ... No backslash-escape sequences"
        ("A='multi\nline \\n $x \"q\"'\n", [("A", 'multi\nline \\n $x "q"')]),
        # "Leading and trailing whitespace outside of the single quotes is discarded"
        ("A=   'padded '   \n", [("A", "padded ")]),
        # double quotes: "Backslash followed by any of ""\`$" will preserve that
        # character. A backslash followed by newline is a line continuation ... A
        # backslash followed by any other character is ignored; both the backslash and
        # the following character are preserved verbatim"
        ('A="q\\" b\\\\ t\\` d\\$ n\\n"\n', [("A", 'q" b\\ t` d$ n\\n')]),
        ('A="one \\\ntwo"\n', [("A", "one two")]),
        ('A="multi\nline"\n', [("A", "multi\nline")]),
        # an empty value is a value
        ("A=\nB=''\n", [("A", ""), ("B", "")]),
        # the last line needs no newline; later assignments win (in load)
        ("A=1\nA=2", [("A", "1"), ("A", "2")]),
        # names that are not environment names are skipped, as systemd does
        ("bad-name=1\n1X=2\nexport Y=3\n_ok=4\n", [("_ok", "4")]),
        # blanks around the name are not part of it
        ("  KEY  =v\n", [("KEY", "v")]),
        # a value may hold "=" and "#"
        ("URL=postgres://u:p@h/db?x=1#frag\n", [("URL", "postgres://u:p@h/db?x=1#frag")]),
    ],
)
def test_systemd_environment_file_rules(text: str, expected: list[tuple[str, str]]) -> None:
    assert parse(text) == expected


def test_optional_files_may_be_missing_required_ones_may_not(tmp_path: Path) -> None:
    first = tmp_path / "env"
    first.write_text("A=1\nB=from first\n")
    second = tmp_path / "env.local"
    second.write_text("B=from second\n")
    assert load([str(first), f"-{second}", f"-{tmp_path / 'absent'}"]) == {
        "A": "1",
        "B": "from second",
    }
    with pytest.raises(EnvFileError, match=f"env file {tmp_path / 'absent'}: No such file"):
        load([str(first), str(tmp_path / "absent")])


def test_globs_are_read_in_order(tmp_path: Path) -> None:
    (tmp_path / "b.env").write_text("X=b\n")
    (tmp_path / "a.env").write_text("X=a\nY=a\n")
    assert load([str(tmp_path / "*.env")]) == {"X": "b", "Y": "a"}
    with pytest.raises(EnvFileError, match="no file matches"):
        load([str(tmp_path / "*.none")])
    assert load([f"-{tmp_path / '*.none'}"]) == {}


def test_a_file_that_is_not_utf8_or_holds_nul_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"A=\xff\n")
    with pytest.raises(EnvFileError, match="not UTF-8"):
        load([str(bad)])
    bad.write_bytes(b"A=x\0y\n")
    with pytest.raises(EnvFileError, match="NUL"):
        load([f"-{bad}"])  # present but invalid: optional does not hide it


def test_an_unreadable_required_file_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(EnvFileError, match=f"env file {folder}: "):
        load([str(folder)])


# --------------------------------------------------------------------------- the options


def test_crash_loop_and_env_file_options_in_the_config(tmp_path: Path) -> None:
    from tests.test_config import problems, program

    web = program(
        tmp_path,
        """
        command = "sleep 10"
        env_files = ["app.env", "-/etc/app/env.local", "-conf.d/*.env"]
        backoff_jitter = 0.25
        max_restarts = 7
        restart_window = 120
        revive_after = 600
        """,
    )
    assert web.env_files == (
        str(tmp_path / "app.env"),
        "-/etc/app/env.local",
        f"-{tmp_path / 'conf.d' / '*.env'}",
    )
    assert (web.backoff_jitter, web.max_restarts, web.restart_window, web.revive_after) == (
        0.25,
        7,
        120.0,
        600.0,
    )
    defaults = program(tmp_path, 'command = "sleep 10"')
    assert (defaults.backoff_jitter, defaults.max_restarts, defaults.revive_after) == (
        0.1,
        None,
        None,
    )
    found = problems(
        tmp_path,
        """
        [programs.web]
        command = ["/bin/true"]
        backoff_jitter = 1.5
        max_restarts = 0
        """,
    )
    assert any("backoff_jitter" in p for p in found) and any("max_restarts" in p for p in found)
