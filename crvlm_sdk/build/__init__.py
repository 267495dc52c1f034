"""Building a bundle from a policy: vectors, alignment, gate, then the sweep over steering and
response settings.
"""
