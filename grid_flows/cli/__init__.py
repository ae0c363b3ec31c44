"""The ``grid`` command: ``app`` (boost, maintenance), ``cluster``, ``offload``.

May import: every layer below it (core, adapters, control, runner, flows, api).
"""
