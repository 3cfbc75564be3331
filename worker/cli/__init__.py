"""The ``imgsync`` command line."""
