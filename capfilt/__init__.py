"""capfilt: BLIP CapFilt as a batch ETL system."""

__version__ = "0.1.0"
