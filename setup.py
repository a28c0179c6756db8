"""Package discovery: src/attnkit installs as ``attnkit`` and the top-level kernels/
folder as ``attnkit.kernels`` (metadata lives in pyproject.toml)."""

from setuptools import find_packages, setup

packages = ["attnkit"] + [f"attnkit.{p}" for p in find_packages("src/attnkit")]
packages += ["attnkit.kernels"] + [f"attnkit.kernels.{p}" for p in find_packages("kernels")]

setup(packages=packages, package_dir={"attnkit": "src/attnkit", "attnkit.kernels": "kernels"})
