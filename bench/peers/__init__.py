"""Peers run on fedmq's workloads in the same run (see flower.py)."""
