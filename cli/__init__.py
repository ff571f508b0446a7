"""The top layer: the `drover` command line assembled from every layer's commands.

Only this package may import everything (producer's commands, the lab, the worker); nothing
imports it. `drover` (pyproject's [project.scripts]) and `python -m cli` run cli/main.py.
"""
