"""Content checks of a stored email."""
