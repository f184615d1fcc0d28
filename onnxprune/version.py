"""The one place the version lives: the facade, the CLI, metadata stamps and pyproject.toml read it here."""

__version__ = "0.1.0"
