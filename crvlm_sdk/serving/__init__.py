"""Steering inside serving engines: the engine-independent core (:mod:`.core`)."""
