"""Tests of persia.worker."""
