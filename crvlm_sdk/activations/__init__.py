"""Reading and writing a model's residual stream: forward-hook plumbing and batched activation
capture at chosen layers and token positions.
"""
