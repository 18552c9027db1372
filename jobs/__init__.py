"""Thin entry points: `python -m jobs.<name> --config conf/... [key=value ...]`."""
