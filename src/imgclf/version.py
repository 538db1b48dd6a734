"""imgclf's version, in a bottom-layer module of its own.

Any layer may read it from here; importing it from the package root instead would import the root's
re-exports, and through them the top layers (`lint-imports` reports that as a wrong-way import).
Keep it equal to `version` in pyproject.toml.
"""

__version__ = "0.1.0"
