"""The short form of an error for a message: its first line, or its type's name."""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(err: BaseException, default: str | None = None) -> str:
    """The first non-blank line of ``err``'s text, for a one-line message.

    Parameters
    ----------
    err : BaseException
        The error.
    default : str, optional
        What to say when the error has no text; default the error type's name.

    Returns
    -------
    str

    Examples
    --------
    >>> first_line(ValueError("bad header\\nat byte 12"))
    'bad header'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if default is None else default
