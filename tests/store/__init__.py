"""Tests of persia.store."""
