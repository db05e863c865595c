"""Inference front ends of Ouroboros3D: the browser app (``python -m inference.app``)."""
