"""data stage of mambavl."""
