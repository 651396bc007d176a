"""Command-line launchers, run as `python -m launch.<name>` (e.g. train,
evaluate) from the repository root, which must be on sys.path.
"""
