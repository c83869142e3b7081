"""Derivative engines along an update direction."""
