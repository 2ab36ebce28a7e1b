"""Maximal correlation: ACE (Breiman & Friedman) with Friedman's supersmoother, compiled and
batched; principal components and scores in, values out.
"""
