"""LPIPS with real ImageNet trunks, offline: the weights cache (filled by the install step) and
the one LPIPS builder that training and evaluation use."""
