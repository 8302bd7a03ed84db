"""Discord: discord.py in, the core's replies out."""
