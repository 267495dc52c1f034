"""Runtime: the Steerer that applies bundles to a frozen model, and the response shaping of
refused rows inside ``generate``.
"""
