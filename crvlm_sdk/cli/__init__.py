"""The ``crvlm`` command line (``crvlm_sdk.cli.app``)."""

from crvlm_sdk.cli.app import app

__all__ = ["app"]
