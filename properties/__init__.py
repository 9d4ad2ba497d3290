"""Hypothesis strategies, properties and targets that check the kernels against the oracle.

The pytest plugin (``properties.plugin``) and the ``flex-oracle`` CLI live here too.
"""
