"""analysis stage of mambavl."""
