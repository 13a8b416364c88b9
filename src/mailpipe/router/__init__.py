"""Sending captured mail on to a real SMTP server (release)."""
