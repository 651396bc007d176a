"""Runs pytest on the test files given as arguments.

The `main` of every py_test in BUILD: Bazel runs a test target's main as a
script, and the test files define pytest tests, not a main of their own.
"""

import sys

import pytest

if __name__ == "__main__":
  sys.exit(pytest.main(["-q", *sys.argv[1:]]))
