"""mambavl: MambaVL fusion of video and question tokens (arXiv 2409.11513) on cached frozen-encoder features."""

__version__ = "0.1.0"
