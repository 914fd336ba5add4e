"""Data only: the firmware profiles shipped with knet (one TOML per device kind).

A package so that wheels carry the TOML files next to ``agent`` (``agent/infer/profiles.py`` looks
for them there); sites add or override kinds in ``/etc/knet/profiles``.
"""
