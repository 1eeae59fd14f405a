"""extract stage of mambavl."""
