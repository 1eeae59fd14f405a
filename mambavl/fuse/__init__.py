"""fuse stage of mambavl."""
