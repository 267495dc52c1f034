"""The refusal bundle: manifest schema, the tensors on disk, and the gate read at one or more
layers.
"""
