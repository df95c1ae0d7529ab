"""postbote's built-in plugins. Each registers on the same hooks third-party plugins use (agent/hookspecs.py)."""
