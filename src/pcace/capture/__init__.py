"""One forward loop over the images, with hooks on the chosen layers; the activation store (in
RAM, on the GPU or spilled to disk).
"""
