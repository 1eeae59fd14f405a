"""cache stage of mambavl."""
