"""Policies: the language models a node trains (see base.Policy for the interface)."""

from .base import Policy, PolicyError, Sample

__all__ = ["Policy", "PolicyError", "Sample"]
