"""The Reverb server process: the replay table and, by default, the variables table."""
