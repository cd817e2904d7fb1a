"""Benchmarks that produce figures for the docs (not timed tests): `depn bench ...`."""
