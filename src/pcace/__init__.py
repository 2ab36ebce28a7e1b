"""pcace: rank the channels and layers of a CNN by PCACE.

PCACE (Casacuberta, Suel & Flaxman, arXiv:2112.15571) scores each channel of a
convolutional layer by the maximal correlation, estimated with ACE on the
channel's first principal components, between its activation maps and a scalar
score of the network's output.
"""

from .ace import AceResult, ace

__version__ = "0.1.0"

__all__ = ["AceResult", "ace", "__version__"]
