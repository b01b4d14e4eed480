"""Pixel, case and detection metrics with case-bootstrap intervals (numpy only)."""
