"""The plugin system: pluggy hook specifications and the manager that collects built-in and
third-party components (``crvlm`` entry-point group) by kind and name.
"""
