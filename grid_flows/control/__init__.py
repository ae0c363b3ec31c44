"""Boost operations: the one code path behind the Python API, the CLI, the runner and the flows.

May import: ``grid_flows.core`` and ``grid_flows.adapters``.
"""
