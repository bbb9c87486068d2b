"""Experiment configurations, installed as ``optax_gc.configs``; ``NAME.py`` has ``get_config()``.

``optax-gc-compare --config=NAME`` finds them by name after any install, from
any directory; a path to a ``.py`` file of your own works too.
"""
