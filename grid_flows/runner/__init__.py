"""The boost-aware Ray task runner and what tasks declare they need.

May import: ``grid_flows.core``, ``grid_flows.adapters``, ``grid_flows.control``.

Example:
    ```python
    from grid_flows.runner.task_runner import BoostRayTaskRunner
    ```
"""
