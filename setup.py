"""Package discovery, the one thing pyproject.toml cannot say here: every package under depn_serve/, plus patches/
installed under the name depn_serve_patches (with every sub-package, one per vLLM release)."""

from setuptools import find_packages, setup

setup(packages=[
    *find_packages(include=["depn_serve", "depn_serve.*"]),
    "depn_serve_patches",
    *(f"depn_serve_patches.{name}" for name in find_packages("patches")),
])
