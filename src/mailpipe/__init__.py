"""mailpipe: an SMTP capture server for developers."""

__version__ = "0.1.0"
