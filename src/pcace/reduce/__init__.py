"""Per channel: standardise the pixel columns and reduce to the first principal components, on
every route (maps in memory, pixel moments over passes, subspace iteration), with the
chooser that picks a route per layer.
"""
