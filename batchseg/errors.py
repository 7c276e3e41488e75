"""Errors as the one-line reasons that go into the `error` column and onto stderr."""


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 500 characters."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
