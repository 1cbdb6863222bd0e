"""Run configuration: schema.py (the typed dataclasses), cli.py (command line, files, --help),
validate.py (checks before any work), presets.py (named override lists)."""
