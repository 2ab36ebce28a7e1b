"""Foundations every stage uses, importing nothing else of pcace: argument checks, the memory
plan, threads, interrupts, the kept heap, the version.
"""
