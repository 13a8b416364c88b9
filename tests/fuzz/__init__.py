"""The fuzz suite (issue 9): hostile and mutated input against the SMTP core, the Goridge
codec, the MIME-to-event path and a live server. `make fuzz` runs it longer."""
