"""Prefect: blocks, the boost store, artifacts, events, settings and task context.

May import: ``grid_flows.core``, other adapters, prefect.
"""
