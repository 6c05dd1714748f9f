"""has_bare_line_ending (core/line_endings.py) against the plain definition, on every short
message of CR, LF and one other byte, and on random longer ones."""

from __future__ import annotations

import itertools
import random
import re

from mailkube_core.line_endings import WINDOW, has_bare_line_ending

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def test_it_agrees_with_the_definition_on_every_short_message() -> None:
    for length in range(8):
        for letters in itertools.product(b"\r\nx", repeat=length):
            content = bytes(letters)
            assert has_bare_line_ending(content) == bool(_BARE.search(content)), content


def test_it_agrees_with_the_definition_on_random_messages() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        lines = [rng.choice([b"a", b".", b"", b"x\r", b"\ny", b"\r\r\n\n"]) for _ in range(20)]
        content = b"\r\n".join(lines)
        assert has_bare_line_ending(content) == bool(_BARE.search(content)), content


def test_crlf_lines_pass_and_bare_ones_do_not() -> None:
    assert not has_bare_line_ending(b"")
    assert not has_bare_line_ending(b"a\r\nb\r\n\r\n")
    assert has_bare_line_ending(b"a\nb")
    assert has_bare_line_ending(b"a\rb")
    assert has_bare_line_ending(b"a\n\rb")  # as many CR as LF, none paired


def test_windows_never_cut_a_pair_and_see_a_bare_ending_anywhere() -> None:
    line = b"x" * 77 + b"\r\n"
    content = line * (3 * WINDOW // len(line) + 7)
    assert len(content) > 3 * WINDOW
    assert not has_bare_line_ending(content)
    # a bare ending at each window boundary and around it
    for at in (WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 78, len(content) - 1):
        for bare in (b"\n", b"\r"):
            broken = content[:at] + bare + content[at:]
            assert has_bare_line_ending(broken) == bool(_BARE.search(broken)), (at, bare)
    # one long line, no LF to end a window on: looked at whole
    assert has_bare_line_ending(b"y" * 3 * WINDOW + b"\r")
    assert not has_bare_line_ending(b"y" * 3 * WINDOW + b"\r\n")


def test_it_agrees_with_the_definition_on_random_messages_of_several_windows() -> None:
    rng = random.Random(5)
    for _ in range(40):
        lines = [b"z" * rng.randrange(0, 200) for _ in range(2000)]
        if rng.random() < 0.7:
            where = rng.randrange(len(lines))
            lines[where] += rng.choice([b"\r", b"\n", b"\n\r"])
        content = b"\r\n".join(lines)
        assert has_bare_line_ending(content) == bool(_BARE.search(content))
