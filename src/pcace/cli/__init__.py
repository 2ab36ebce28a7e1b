"""The ``pcace`` command: a thin layer over the public functions, its print-out and the demo."""
