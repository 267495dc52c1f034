"""Evaluation: systems compared on a policy's test split, metrics with intervals, reports.
"""
