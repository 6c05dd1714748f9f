"""has_bare_line_ending (core/line_endings.py) against the plain definition, on every short
message of CR, LF and one other byte, and on random longer ones."""

from __future__ import annotations

import itertools
import random
import re

from mailkube_core.line_endings import has_bare_line_ending

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
