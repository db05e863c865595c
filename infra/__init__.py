"""Cluster and DeepSpeed configuration files.

A package only so that ``infra/deepspeed/*.json`` ship as package data: the trainer reads them
with ``importlib.resources`` (``training/engine.py``), from a checkout and from an installed
wheel alike. ``render.yaml`` and ``render_onprem.yaml`` (for ``ray up``) and ``hostfile.example``
(for the ``deepspeed`` launcher) are used from a checkout.
"""
