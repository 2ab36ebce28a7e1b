"""pcace: rank the channels and layers of a CNN by PCACE.

PCACE (Casacuberta, Suel & Flaxman, arXiv:2112.15571) scores each channel of a
convolutional layer by the maximal correlation, estimated with ACE on the
channel's first principal components, between its activation maps and a scalar
score of the network's output.
"""

from .core.version import __version__
from .maxcorr.ace import AceResult, ace
from .results.result import PCACEResult, load
from .run.rank import rank

__all__ = ["AceResult", "PCACEResult", "ace", "load", "rank", "__version__"]
