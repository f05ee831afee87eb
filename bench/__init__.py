"""Tessera's benchmarks: each hot path against a baseline run side by side in the same run (`make bench`).

A benchmark reports; it never fails on a timing. `python -m bench` runs the scenarios, alternating baseline and
subject (ABAB...) so that the machine's noise falls on both, and writes BENCHMARKS.md.
"""
