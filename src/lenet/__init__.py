"""lenet: the LeNet chapter of Dive into Deep Learning as fast, trustworthy software."""

__version__ = "0.1.0"
