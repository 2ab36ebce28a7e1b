"""pcace: rank the channels and layers of a CNN by PCACE.

PCACE (Casacuberta, Suel & Flaxman, arXiv:2112.15571) scores each channel of a
convolutional layer by the maximal correlation, estimated with ACE on the
channel's first principal components, between its activation maps and a scalar
score of the network's output.
"""

__version__ = "0.1.0"

from .ace import AceResult, ace  # noqa: E402
from .rank import rank  # noqa: E402
from .result import PCACEResult, load  # noqa: E402

__all__ = ["AceResult", "PCACEResult", "ace", "load", "rank", "__version__"]
