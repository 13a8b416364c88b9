"""Handing captured messages on to real SMTP servers (deliver.py: one message, once)."""
