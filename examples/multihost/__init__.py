"""Workers on several hosts sharing one Redis: see README.md here."""
