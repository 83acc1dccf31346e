"""bccd-batch: nightly blood-smear cell counting with Faster R-CNN."""

__version__ = "0.1.0"
