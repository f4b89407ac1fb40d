"""Thin shim: the project is configured in setup.cfg."""

from setuptools import setup

setup()
