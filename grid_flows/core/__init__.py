"""The pure core: decisions on plain data, with the clock passed in.

May import: the standard library, pydantic, yaml and other ``grid_flows.core`` modules.
Never ray, prefect or any other layer; ``tests/unit/test_architecture.py`` checks what a
fresh interpreter loads.

Example:
    ```python
    from grid_flows.core.placement import place
    ```
"""
