"""Content checks of a stored email, on demand: HTML compatibility with email clients
(html.py, from caniemail's data), links (links.py), and a rendered screenshot
(screenshot.py), and the spam score from SpamAssassin's spamd (spam.py, spamd.py). The
analysis is pure; outbound requests, spamd and the browser are kept apart."""
