"""Foundations: the errors a user can cause, atomic outputs, the one table type."""
