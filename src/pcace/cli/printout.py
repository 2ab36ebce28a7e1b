"""The plain-text account of a run that the ``pcace`` command prints.

The text itself is made in :mod:`pcace.results.printout` (the library's
``print(result)`` says the same); this module keeps the command's names for it.
"""

from __future__ import annotations

from ..results.printout import brief_summary, many_summary, summary_text, text_summary

__all__ = ["brief_summary", "many_summary", "summary_text", "text_summary"]
