"""``python -m crvlm_sdk.cli``."""

from crvlm_sdk.cli.app import app

app()
