"""The activation cache: its entry format and checks, and the command that manages it."""
