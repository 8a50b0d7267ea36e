"""Peer benchmark: the same Redis workloads on taskprocessor and other task queues.

Run ``python benchmarks/peers/run.py`` (from a virtualenv with the ``bench`` extra);
README.md beside this file explains each workload.
"""
