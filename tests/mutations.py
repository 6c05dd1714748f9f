"""Byte-level mutations of a message for hypothesis fuzz tests of parsers and verifiers."""

from __future__ import annotations

from hypothesis import strategies as st

Mutation = tuple[int, str, bytes]


def mutations(junk: st.SearchStrategy[bytes]) -> st.SearchStrategy[Mutation]:
    """One edit: (position, insert|delete|replace, bytes), the bytes from `junk` (tokens the
    parser cares about) or random."""
    return st.tuples(
        st.integers(min_value=0),
        st.sampled_from(["insert", "delete", "replace"]),
        junk | st.binary(min_size=1, max_size=6),
    )


def mutate(message: bytes, edits: list[Mutation]) -> bytes:
    data = bytearray(message)
    for position, operation, chunk in edits:
        at = position % (len(data) + 1)
        if operation == "insert":
            data[at:at] = chunk
        elif operation == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at : at + len(chunk)] = chunk
    return bytes(data)
